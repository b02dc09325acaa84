"""The continuous pipeline: `graceful run CONFIG` takes every listed generation from
training to a final state, one stage at a time, the registry holding where each is.

    stages   the stage of a generation as a pure function of what the registry holds
    notify   the optional webhook every stage transition is posted to
    loop     the reconciler: find the next stage, perform it, record the transition
"""

__all__ = ["stages", "notify", "loop"]
