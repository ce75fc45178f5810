"""Backbones as Hugging Face models. Importing this package registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from models import dense, moe, multimodal

AutoConfig.register("alignflow_dense", dense.DenseConfig)
AutoModel.register(dense.DenseConfig, dense.DenseModel)
AutoModelForCausalLM.register(dense.DenseConfig, dense.DenseForCausalLM)
AutoModelForSequenceClassification.register(dense.DenseConfig, dense.DenseForSequenceClassification)

AutoConfig.register("alignflow_moe", moe.MoeConfig)
AutoModel.register(moe.MoeConfig, moe.MoeModel)
AutoModelForCausalLM.register(moe.MoeConfig, moe.MoeForCausalLM)
AutoModelForSequenceClassification.register(moe.MoeConfig, moe.MoeForSequenceClassification)

AutoConfig.register("alignflow_multimodal", multimodal.MultimodalConfig)
AutoModel.register(multimodal.MultimodalConfig, multimodal.MultimodalModel)
AutoModelForCausalLM.register(multimodal.MultimodalConfig, multimodal.MultimodalForCausalLM)

# Named sizes: each builder returns a config for a given vocab_size.
SIZES = {
    "dense-tiny": dense.dense_tiny,
    "dense-30m": dense.dense_30m,
    "dense-125m": dense.dense_125m,
    "moe-tiny": moe.moe_tiny,
    "moe-small": moe.moe_small,
    "moe-base": moe.moe_base,
    "multimodal-tiny": multimodal.multimodal_tiny,
}
