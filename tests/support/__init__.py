"""What the tests share (importable as `support.<module>`; pytest.ini puts tests/ on the path):

  configs        tiny model / run configurations
  world          THE spawned-world worker (train runs on gloo ranks) and THE single-process
                 reference builder every parity test compares with
  layouts        the parallel layouts (tp, pp, dp x pp x tp with ZeRO) that must reproduce
                 single-process training, grouped by world size, and the resharding cases
  dp_cases       the data-parallel / ZeRO stage x variant runs (comm volume, memory, parity)
  dp_probes      overlap probe of the data-parallel engines
  tp_checks      rank functions of the tensor-parallel layer checks
  pipeline_faults  rank functions of the pipeline executor's failure tests
  ckpt_world     checkpoint save / reshard / resume cases in one world
  kernels        device, skip marks and fwd+bwd helper of the kernel tests
  launch         `python -m pyruntime train` as N plain processes (watchdog / crash tests)
"""
