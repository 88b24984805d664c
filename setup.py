from setuptools import find_packages, setup

setup(
    name="ngdiff_ds",
    version="0.1.0",
    description="NGDiff LLM unlearning (normalised two-task gradients + GeN learning rate) on DeepSpeed ZeRO-3",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ngdiff_ds", "ngdiff_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        # ngdiff_ds/zero3.py reads ZeRO-3 internals checked on this range only.
        "deepspeed>=0.19.0,<0.20",
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",  # transformers needs it for HfDeepSpeedConfig / zero.Init loading
        "datasets>=3.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "mpi4py>=3.1",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "numpy>=1.24",
        "scipy>=1.10",
        "rouge-score>=0.1.2",
        "matplotlib>=3.7",  # the forget-quality vs utility plot
        "pyarrow>=14",
        "peft>=0.13",  # --lora-rank: adapters instead of the full weights
    ],
    extras_require={"test": ["pytest>=8"], "mpi": ["mpich"]},
)
