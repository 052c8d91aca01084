"""A sequence classifier on the attention-masked mean of an encoder's last hidden states.

This file travels inside every model folder that full_finetune.py saves with POOLING = "mean":
config.json names it in `auto_map`, so the folder loads anywhere with only torch and
transformers installed:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

Keep it importing nothing but torch and transformers.
"""

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingConfig(PretrainedConfig):
    """The encoder's own configuration (a dict, with its model_type) plus the head's settings.

    Its model_type is our own, so that loading the folder without trust_remote_code fails
    instead of silently building the encoder's standard head with random weights.
    """

    model_type = "mean_pooling_classifier"

    def __init__(self, encoder=None, cosine_scale=None, classifier_dropout=0.1, calibration_temperature=1.0,
                 **kwargs):
        self.encoder = encoder.to_dict() if isinstance(encoder, PretrainedConfig) else dict(encoder or {})
        self.cosine_scale = cosine_scale  # None: a linear head; else logits = scale x cosine similarity
        self.classifier_dropout = classifier_dropout
        # The logits are divided by it: fitted after training, so that the probabilities are calibrated.
        self.calibration_temperature = calibration_temperature
        super().__init__(**kwargs)

    def encoder_config(self):
        return AutoConfig.for_model(**self.encoder)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """Mean pooling, dropout, then a linear head or a cosine head (no bias: it would shift logits
    whose range the scale sets). Sentence encoders such as all-MiniLM-L6-v2 were trained with
    exactly this pooling, compared by cosine."""

    config_class = MeanPoolingConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config, encoder=None):
        super().__init__(config)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config.encoder_config())
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused; under DDP a parameter without a gradient is an error
        self.dropout = torch.nn.Dropout(config.classifier_dropout)
        hidden_size = self.encoder.config.hidden_size
        self.classifier = torch.nn.Linear(hidden_size, config.num_labels, bias=config.cosine_scale is None)
        torch.nn.init.normal_(self.classifier.weight, std=0.02)
        if self.classifier.bias is not None:
            torch.nn.init.zeros_(self.classifier.bias)
        self.post_init()

    def _init_weights(self, module):
        pass  # the encoder comes pre-trained or from its own from_config; the head is set above

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def pool(self, input_ids, attention_mask, **inputs):
        """The attention-masked mean of the last hidden states: one vector per text."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **inputs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled = self.dropout(self.pool(input_ids, attention_mask, **inputs))
        if self.config.cosine_scale is None:
            logits = self.classifier(pooled)
        else:
            # In fp32 even under autocast: bf16 keeps ~3 digits of a cosine, which the scale multiplies.
            with torch.autocast(pooled.device.type, enabled=False):
                weight = F.normalize(self.classifier.weight.float(), dim=-1)
                logits = self.config.cosine_scale * (F.normalize(pooled.float(), dim=-1) @ weight.T)
        logits = logits / self.config.calibration_temperature
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
