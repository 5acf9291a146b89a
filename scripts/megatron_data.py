#!/usr/bin/env python3
"""Writes moec training data as a Megatron-Core indexed dataset (PREFIX.bin + PREFIX.idx).

    python scripts/megatron_data.py TOKENS.bin PREFIX --dtype u16   # tokens("...", dtype = u16)
    python scripts/megatron_data.py TEXT.txt PREFIX --bytes          # text("..."): bytes are tokens

The token file is read as moec reads it: little-endian ids, either flat (nanoGPT) or an llm.c
fineweb shard (a 256 x int32 header: magic 20240520 / version 1 for u16, 20240801 / version 7 for
u32). The whole stream is one document, so Megatron's GPTDataset samples windows across it as moec
does; pass the prefix to pretrain_gpt.py as --data-path. No re-tokenising: the ids are moec's.

Needs numpy and megatron-core (pip install megatron-core numpy).
"""

import argparse
import sys

import numpy as np

SHARD_HEADER_INTS = 256
SHARDS = {20240520: (1, np.uint16), 20240801: (7, np.uint32)}
# Rows handed to the builder at a time (one document made of many items).
CHUNK = 1 << 20


def read_tokens(path, dtype):
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size >= SHARD_HEADER_INTS * 4:
        header = raw[: SHARD_HEADER_INTS * 4].view("<i4")
        if int(header[0]) in SHARDS:
            version, shard_dtype = SHARDS[int(header[0])]
            if int(header[1]) != version:
                sys.exit(f"{path}: shard version {header[1]}, expected {version}")
            if shard_dtype != dtype:
                sys.exit(f"{path}: the shard holds {np.dtype(shard_dtype)} tokens, not {np.dtype(dtype)}")
            tokens = raw[SHARD_HEADER_INTS * 4 :].view(np.dtype(dtype).newbyteorder("<"))
            if tokens.size != int(header[2]):
                sys.exit(f"{path}: header says {header[2]} tokens, file holds {tokens.size}")
            return tokens
    width = np.dtype(dtype).itemsize
    if raw.size % width:
        sys.exit(f"{path}: {raw.size} bytes is not a whole number of {np.dtype(dtype)} tokens")
    return raw.view(np.dtype(dtype).newbyteorder("<"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="moec's token file (or text file with --bytes)")
    parser.add_argument("prefix", help="output prefix: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--dtype", choices=["u16", "u32"], default="u16")
    parser.add_argument("--bytes", action="store_true", help="the file's bytes are the tokens")
    args = parser.parse_args()

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if args.bytes:
        tokens = np.fromfile(args.source, dtype=np.uint8).astype(np.uint16)
        dtype = np.uint16
    else:
        dtype = np.uint16 if args.dtype == "u16" else np.uint32
        tokens = read_tokens(args.source, dtype)
    # Megatron reads ids as the smallest dtype that holds the vocabulary; u32 ids go as int32.
    out_dtype = np.uint16 if dtype == np.uint16 else np.int32
    builder = IndexedDatasetBuilder(f"{args.prefix}.bin", dtype=out_dtype)
    for start in range(0, tokens.size, CHUNK):
        chunk = tokens[start : start + CHUNK].astype(out_dtype)
        builder.add_item(torch.from_numpy(chunk.astype(np.int64)))
    builder.end_document()
    builder.finalize(f"{args.prefix}.idx")
    print(f"wrote {tokens.size} tokens to {args.prefix}.bin / .idx")


if __name__ == "__main__":
    main()
