"""graceful's training data plane (never imports orchestrator or serving).

    specs       typed specs of data, models, training, compatibility, scaling
    factory     user code by import path (model and data factories)
    data        datasets and splits (built-in sources, npz, custom factories, per-generation data)
    streaming   `data.source: ray`: a Ray Dataset split, checked and streamed to the workers
    models      architectures (mlp, cnn1d, cnn2d, custom modules; L2-normalised embedding + cosine head)
    checkpoint  the checkpoint format and its one loader (`load_model`, every kind)
    losses      compatibility terms (BCT, Focal Distillation, ensemble distillation)
    training    the step loop and in-process helpers
    train       the Ray Train job of one generation (`run_training`)
    lqf         linearised fine-tuning (`recipe: lqf`)
    interpolation  weight interpolation toward the parent (BCWI, `compat.weight_interpolation`)
    transform   old-to-new embedding transformation of stored vectors (FCT-style)
    embedding   catalogue items and their batch embedding with Ray Data
"""

__all__ = ["specs", "factory", "data", "streaming", "models", "checkpoint", "losses", "training", "train", "lqf", "interpolation",
           "transform", "embedding"]
