"""Hugging Face Hub integration: pull LoRAs and base weights through huggingface_hub's cache, push ports.

Everything goes through ``huggingface_hub`` (its cache, its token lookup: ``HF_TOKEN`` or the stored
login, its ``HF_ENDPOINT``). Errors become one-line :class:`lorareg.errors.LoraregError` messages that
never contain a token.

:mod:`.client` holds what pull and push share; :mod:`.pull`, :mod:`.push` and :mod:`.card` one job each.
"""
