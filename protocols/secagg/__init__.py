"""SecAgg+ (Bell et al. 2020): secure aggregation with dropouts, as a multi-round FedAvg."""
