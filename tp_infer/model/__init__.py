"""The DeepSeek-V2/V3 transformer: pure math over a step's new tokens and a view of the KV pool."""
