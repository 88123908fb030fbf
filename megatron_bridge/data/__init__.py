"""SFT data for Megatron: chat-template tokenization with response-only loss masks (`chat`),
best-fit-decreasing packing (`packing`), the indexed-dataset format the trainer reads
(`indexed`), and the streaming multi-process tokenization pipeline (`pipeline`)."""
