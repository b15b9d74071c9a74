"""What connects the package to the outside: the lm-eval model and its import hook, the tiny trained
checkpoints' tasks. The top layer: it imports the package's public API, and nothing imports it back."""
