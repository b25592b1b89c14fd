"""Fine-tuning: datasets, the llama.cpp trainer and its worker process."""
