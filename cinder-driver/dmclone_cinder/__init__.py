"""Cinder volume driver for node-local storage on dmclone agents."""
