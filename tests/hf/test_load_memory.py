"""Memory of quantizing at load: the float checkpoint's pages go back as each weight is quantized."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from optimum_splitquant.hf.memory import release_file_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux only")


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


@pytest.fixture
def mapped(tmp_path):
    """A 16 MiB float32 tensor read through safetensors' file map (as transformers reads checkpoints), and its values."""
    values = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    save_file({"w": values}, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        yield f.get_slice("w")[...], values


@linux
def test_release_drops_the_resident_pages_of_a_mapped_tensor(mapped):
    tensor, values = mapped
    assert torch.equal(tensor, values)  # every page read
    before = _rss_file_mib()
    assert release_file_pages(tensor)
    assert _rss_file_mib() < before - 12
    assert torch.equal(tensor, values)  # read again from the file


@linux
def test_a_written_page_is_kept(mapped):
    tensor, values = mapped
    tensor[1000, 0] = 123.0  # a private copy of that page now holds the only such value
    assert not release_file_pages(tensor)
    assert float(tensor[1000, 0]) == 123.0
    assert torch.equal(tensor[:1000], values[:1000])


def test_a_heap_tensor_is_left_alone():
    tensor = torch.randn(1024, 1024)
    expected = tensor.clone()
    assert not release_file_pages(tensor)
    assert torch.equal(tensor, expected)


def test_a_non_contiguous_view_is_left_alone(mapped):
    tensor, values = mapped
    assert not release_file_pages(tensor.t())
    assert torch.equal(tensor, values)


_LOAD = textwrap.dedent(
    """
    import json, sys
    import transformers
    import optimum_splitquant

    def status():
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in f)
                    if k in ("VmHWM", "VmRSS")}

    folder, bits = sys.argv[1], sys.argv[2]
    kwargs = {} if bits == "float" else {"quantization_config": optimum_splitquant.SplitQuantConfig(bits=int(bits))}
    model = transformers.AutoModel.from_pretrained(folder)  # warms the imports and the kernels' first use
    del model
    before = status()
    model = transformers.AutoModel.from_pretrained(folder, **kwargs)
    print(json.dumps({"peak_rise": status()["VmHWM"] - before["VmRSS"]}))
    """
)


@linux
def test_quantizing_at_load_holds_about_one_float_layer(tmp_path):
    """24 layers of 4 MiB (96 MiB of float weights): no page of a quantized weight stays resident.

    Measured: the peak rises 166 MiB (one layer's quantizing temporaries; bits=8, k=3, 1 M weights), against
    279 MiB while every float page stayed resident and the heap kept the freed temporaries.
    """
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=16,
    )
    BertModel(config).save_pretrained(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(tmp_path), "8"], capture_output=True, text=True, check=False, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rise = json.loads(done.stdout.strip().splitlines()[-1])["peak_rise"]
    assert rise < 200, f"the load raised the peak resident memory by {rise:.0f} MiB"


def test_the_freed_heap_goes_back_once_the_resident_memory_grew_past_the_bound(monkeypatch):
    import optimum_splitquant.hf.memory as memory

    resident = iter([1000, 1500, 2000, 2001, 1100, 1200, 2200, 900])
    returns = []
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(resident))
    monkeypatch.setattr(memory, "return_freed_heap", lambda: returns.append(True))
    heap = memory.HeapReturner(above=1000)  # marks 1000
    heap.layer_done()  # 1500
    heap.layer_done()  # 2000: grown by 1000, not more
    assert returns == []
    heap.layer_done()  # 2001: returned, marks 1100
    assert len(returns) == 1 and heap.mark == 1100
    heap.layer_done()  # 1200
    heap.layer_done()  # 2200: returned, marks 900
    assert len(returns) == 2 and heap.mark == 900


def test_the_freed_heap_goes_back_after_every_layer_where_the_resident_memory_is_unknown(monkeypatch):
    import optimum_splitquant.hf.memory as memory

    returns = []
    monkeypatch.setattr(memory, "resident_bytes", lambda: None)
    monkeypatch.setattr(memory, "return_freed_heap", lambda: returns.append(True))
    heap = memory.HeapReturner()
    for _ in range(3):
        heap.layer_done()
    assert len(returns) == 3


@linux
def test_resident_bytes_reads_this_process():
    from optimum_splitquant.hf.memory import resident_bytes

    size = 64 << 20
    block = mmap.mmap(-1, size)  # fresh pages, outside the heap
    before = resident_bytes()
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    grown = resident_bytes() - before
    block.close()
    assert size <= grown < size + (8 << 20), grown
