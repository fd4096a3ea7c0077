"""Launcher detection, process groups and the engines that wrap G and D."""
