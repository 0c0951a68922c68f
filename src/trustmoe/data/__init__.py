"""Data governance: sources, manifest, dedup, PII, contamination, poisoning, datasheet, build.

    from trustmoe.data.build import BuildOptions, build_dataset
    result = build_dataset(["stdlib"], Path("runs/data"), BuildOptions(vocab_size=4096))
    result.summary()            # documents kept/dropped, tokens per split, audit counts
    result.manifest_sha256      # names the dataset; later artifacts record it

    from trustmoe.data.manifest import verify
    verify(Path("runs/data"))   # {"ok", "changed", "appeared", "vanished", ...}

Modules: `sources` (folders, text, JSONL, Parquet, `stdlib`), `licenses` (SPDX), `quality`,
`text` (normalisation, vectorised word/n-gram hashing), `dedup` (MinHash LSH), `pii`,
`contamination` (n-gram hash index), `poison` (screen), `rules` (the pipeline), `manifest`
(+ verify), `card` (DATASHEET.md), `audit_page` (audit.html), `explain` (what each finding
means, what was done, what to do; known boilerplate ranked last), `build` (stages, resume),
`tokenizer`, `shards`.
"""
