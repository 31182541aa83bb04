"""The learning side beside the algorithms: datasets, partitioners, models and the generic
torch learner that `protocols.learners.make` builds from `[workload]`, `[data]` and `[eval]`."""
