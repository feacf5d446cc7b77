"""Parts a model is built from: pretrained backbones and where their weights come from."""
