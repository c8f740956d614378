"""A small config per architecture, with its features on (windows shorter than the longer prompts, soft-caps,
partial rotary with LongRoPE, post-norm OPT with project_in/out), made with transformers' own config classes."""

WINDOW = 64


def configs() -> dict:
    """A small config per architecture with its features on: windows, soft-caps, partial rotary, post-norm OPT."""
    import transformers as tf

    common = dict(vocab_size=5000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 256, "short_factor": [1.0 + i / 24 for i in range(24)],
                "long_factor": [1.0 + 4 * i / 24 for i in range(24)]}
    return {
        "LlamaForCausalLM": tf.LlamaConfig(**common),
        "Qwen2ForCausalLM": tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=2),
        "Qwen3ForCausalLM": tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True),
        "MistralForCausalLM": tf.MistralConfig(**common, sliding_window=WINDOW),
        "Phi3ForCausalLM": tf.Phi3Config(**(common | dict(num_attention_heads=4, num_key_value_heads=4)),
                                         rope_parameters=longrope, sliding_window=WINDOW, pad_token_id=0),
        "Gemma2ForCausalLM": tf.Gemma2Config(**common, head_dim=128, sliding_window=WINDOW,
                                             query_pre_attn_scalar=144, attn_logit_softcapping=50.0,
                                             final_logit_softcapping=30.0),
        "Gemma3ForCausalLM": tf.Gemma3TextConfig(**common, head_dim=256, sliding_window=WINDOW,
                                                 rope_parameters={
                                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                        "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 1e4}},
                                                 layer_types=["sliding_attention"] * 3 + ["full_attention"]),
        "OPTForCausalLM": tf.OPTConfig(vocab_size=5000, hidden_size=256, ffn_dim=512, num_hidden_layers=4,
                                       num_attention_heads=4, max_position_embeddings=2048,
                                       do_layer_norm_before=False, word_embed_proj_dim=128),
        "GPT2LMHeadModel": tf.GPT2Config(vocab_size=5000, n_embd=256, n_layer=4, n_head=4, n_positions=2048),
    }
