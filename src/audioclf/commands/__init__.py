"""The bodies of the ``audioclf`` commands that do more than call one library function: reading their
inputs (files, folders, lists of paths, stdin), checking their outputs before any model work, and writing
them. Each takes plain keyword arguments (``cli.py`` parses the flags) and returns the exit code or the
values ``cli.py`` reports.
"""
