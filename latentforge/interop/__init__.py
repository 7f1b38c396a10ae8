"""Moving weights between latentforge and other libraries (Hugging Face transformers)."""
