"""graceful's training data plane (never imports orchestrator or serving).

    specs       typed specs of data, models, training, compatibility, scaling
    data        datasets and splits
    models      architectures (L2-normalised embedding + cosine head)
    checkpoint  the checkpoint format and its one loader (`load_model`, every kind)
    losses      compatibility terms (BCT, Focal Distillation, ensemble distillation)
    training    the step loop and in-process helpers
    train       the Ray Train job of one generation (`run_training`)
    lqf         linearised fine-tuning (`recipe: lqf`)
"""

__all__ = ["specs", "data", "models", "checkpoint", "losses", "training", "train", "lqf"]
