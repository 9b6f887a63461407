from setuptools import setup

setup(
    name="fastddpm",
    version="0.1.0",
    description="DDPM training and sampling with the per-step work in fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ ships inside the distribution as fastddpm.kernels: a top-level ``kernels``
    # package would clash with an unrelated PyPI project of that name.
    packages=["fastddpm", "fastddpm.commands", "fastddpm.schedulers", "fastddpm.kernels"],
    package_dir={"fastddpm": "fastddpm", "fastddpm.kernels": "kernels"},
    package_data={"fastddpm": ["assets/*"]},
    install_requires=[
        "torch>=2.8",  # its Triton (3.4+) has the knobs fastddpm.ops sets for the interpreter
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "Pillow",
        "safetensors",
        "scikit-learn",
    ],
    extras_require={
        # fastddpm.DDPMScheduler / DDIMScheduler subclass diffusers' schedulers
        "diffusers": ["diffusers"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "diffusers", "scipy"],
        "bench": ["pytest-benchmark", "diffusers", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastddpm=fastddpm.cli:main"]},
)
