"""What tests share: launching runs and commands (runs), tiny HF models (hf_tiny), real model
geometries (real_geometry), a served model (serve)."""
