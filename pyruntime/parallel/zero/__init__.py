"""ZeRO: optimizer states (stage 1), gradients (stage 2) and parameters (stage 3, fully
sharded) split over the dp ranks. Built through pyruntime.parallel.data.apply_data_parallel."""
