"""The short README.md written into every converted folder (also the Hub model card)."""

from __future__ import annotations

from sparsek.runtime.configuration_sparsek import SparseSettings


def model_card(source_name: str, base_model_type: str, settings: SparseSettings, version: str,
               hub_id: str | None) -> str:
    front = ["---", "library_name: transformers", "tags:", "- sparsek", "- sparse-attention", f"- {settings.method}"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front.append("---")
    if settings.method == "sparsek":
        how = (
            "Each query attends to a local window of "
            f"{settings.window} keys plus the top {settings.topk} older keys chosen by a small learned scorer "
            f"(recency slope alpha = {settings.alpha:g}). The scorer starts at zero, so before `sparsek adapt` "
            f"the model behaves like a sliding window of {settings.window + settings.topk} keys."
        )
    else:
        how = (
            f"Old context is pooled into one core token per group of {settings.group} tokens; the last "
            f"{settings.cca_window} tokens stay raw. No new parameters."
        )
    body = f"""
# {settings.describe()} conversion of `{source_name}`

Converted by `sparsek` {version} from a `{base_model_type}` checkpoint: the dense
weights are unchanged, the attention is sparse. {how}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_ID", trust_remote_code=True)  # sparse attention
dense = AutoModelForCausalLM.from_pretrained("PATH_OR_ID", trust_remote_code=True,
                                             attn_implementation="sdpa")  # same weights, dense
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_ID")
```

The hyper-parameters live in `config.json` (`sparse_method`, `sparsek_topk`, `sparsek_window`,
`sparsek_alpha`, `cca_group`, `cca_window`) and can be overridden at load time, e.g.
`from_pretrained(..., sparsek_topk=512)`. With the `sparsek` package installed, its Triton kernels
are used on CUDA; otherwise the PyTorch code shipped in this folder runs.
"""
    return "\n".join(front) + "\n" + body
