import re

from setuptools import setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()
# One home for the version: tcprelay.__version__ (read, not imported).
with open("tcprelay/__init__.py", encoding="utf-8") as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setup(
    name="tcprelay",
    version=version,
    description="A TCP relay in pure Python, byte-compatible with Go's muxado v2",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=["tcprelay"],
    python_requires=">=3.6",
    entry_points={
        "console_scripts": [
            "tcprelay-relay = tcprelay.relay:main",
            "tcprelay-echoserver = tcprelay.echoserver:main",
            "tcprelay-adapter = tcprelay.adapter:main",
            "tcprelay-status = tcprelay.status:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Operating System :: POSIX",
    ],
)
