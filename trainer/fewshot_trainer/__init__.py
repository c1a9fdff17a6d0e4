"""fewshot training: MSN pretraining of timm Vision Transformers, ONNX export, few-shot evaluation."""
