"""The trainer and its tools: config, DeepSpeed training, plan, demo, benchmark, export, publish."""
