"""Performance evaluation: latency, throughput, serving load, roofline estimates and
perplexity (`miaotui bench ...`, `miaotui estimate`, `miaotui perplexity`)."""
