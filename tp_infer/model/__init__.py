"""The DeepSeek-V2/V3/V3.2 transformer: pure math over a step's new tokens and a view of the KV pool."""
