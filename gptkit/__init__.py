"""The toolkit's library: one module per reason to change. The training scripts at the repository
root are thin over it, and `gpt_train` gathers its names for `import gpt_train as gt` (DESIGN.md has
the map).

    errors, files, progress, cli                   no torch: the data tools load fast
    registry, components, plugins, config          one registry per kind of component; their settings as
                                                   flags; --plugin; --config files
    tokenizer (registry), tokenizer_train,         the process's tokenizer (GPT-2's BPE offline, one trained
      hf_tokenizer, gutenberg/                     here, any tokenizer.json); training one; the books
    data/  sources (registry), local (formats), smollm, hf_disk, cache (the token cache), batches
    model, attention (registry), parts/            GPTConfig, presets, GPTModel; attention kinds and the
                                                   KV cache; position, norm, MLP, init, archs
    optim/ (registry) adamw, galore, muon          optimizers, each one file
    schedules (registry), metrics (registry)       LR schedules; what a step reports
    evals/ (registry) scorer, hellaswag, core      evaluations on one scorer
    loss, generation, runtime, planner             cross-entropy and bits per byte; text (KV cache);
                                                   device and wrapping; the memory plan
    loop, trainer, run, sinks, args                train_step; the Trainer (the loop); the run folder
                                                   and --check; logs; the settings both scripts share
    checkpoint/ state, store, folder, runinfo      what a checkpoint holds; its files; the run folder;
                                                   run.json and the run's status
    weights, hf                                    weights in and out; Hugging Face both ways
    scaling                                        the fits behind scaling.py (isoFLOP, L(N, D), bootstrap)
"""
