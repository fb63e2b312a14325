"""The toolkit's library: one module per reason to change. The training scripts at the repository
root are thin over it, and `gpt_train` gathers its names for `import gpt_train as gt`.

    errors, files, progress, config, cli     no torch: the data tools load fast
    tokenizer                                GPT-2 BPE, offline (no torch)
    data/  sources (registry), local, smollm, hf_disk, cache (the token cache), batches
    model, attention (registry)              GPTConfig, presets, GPTModel; attention kinds
    optim/ (registry) adamw, galore, muon    optimizers, each one file
    schedules (registry), metrics (registry) LR schedules; what a step reports
    evals/ (registry) hellaswag              evaluations beside the validation loss
    loss, generation, runtime, planner       cross-entropy and evaluation; text; device and
                                             wrapping; the memory plan
    loop, run, sinks, args                   train_step/train_model; around the loop; logs; the
                                             settings both scripts share
    checkpoint/ state, store, folder         what a checkpoint holds; its files; the run folder
"""
