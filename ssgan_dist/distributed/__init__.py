"""Launcher detection and process groups, the rank collectives, and the engines that train a task's networks."""
