"""Graph passes over captured Hugging Face models (installed as ``asaf_fx.passes``)."""
