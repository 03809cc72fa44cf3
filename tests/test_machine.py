"""benchmarks/machine.py: the CPU summary the side-by-side benchmarks put in their JSON."""

from benchmarks.machine import cpu_summary

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: other
flags\t\t: amx_tile
"""


def test_reads_the_first_processor(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO)
  got = cpu_summary(str(path))
  assert got["model"] == "AMD EPYC 9B45" and got["vendor"] == "AuthenticAMD"
  assert (got["family"], got["model_number"]) == ("26", "2")
  assert got["vector_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"]
  assert got["cpus"] >= 1


def test_missing_file_gives_unknown(tmp_path):
  got = cpu_summary(str(tmp_path / "none"))
  assert got["model"] == "unknown" and got["vector_flags"] == []
