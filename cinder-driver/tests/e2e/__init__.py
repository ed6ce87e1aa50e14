"""End-to-end tests: the driver against real dmclone agents.

They need a kernel with device-mapper (dm-thin, dm-clone) and the NVMe/TCP
target and host, root, and the agent binaries, so they are not unit tests:
`tests/__main__.py` does not find them (no module here is named test*.py).
`cinder-driver/run-e2e` boots the project's guest kernel and runs
`python -m tests.e2e` in it; see scenarios.py for what is covered.
"""
