from setuptools import find_packages, setup

setup(
    name="ahbf",
    version="0.1.0",
    description="Fast online knowledge distillation with Adaptive Hierarchy-Branch Fusion (AHBF-OKD)",
    python_requires=">=3.10",
    packages=find_packages(include=["ahbf", "ahbf.*"]),
    package_data={"ahbf": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "scikit-learn>=1.2",
        "tensorboard>=2.12",
        "pillow>=9",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "dali-cuda120": ["nvidia-dali-cuda120"],
        "timm": ["timm>=1.0"],  # timm:<name> models (docs/models.md)
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "nvidia-dali-cuda130", "timm>=1.0"],
    },
    entry_points={
        "console_scripts": [
            "ahbf-train=ahbf.engine.cli:train_main",
            "ahbf-eval=ahbf.engine.cli:eval_main",
            "ahbf-export=ahbf.engine.cli:export_main",
        ]
    },
)
