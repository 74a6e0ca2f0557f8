"""The README as a test reads it: its sections, the option tables in them, and
the options each ``--help`` group lists."""

import argparse
import os
import re

from helpers.basics import ROOT

README = os.path.join(ROOT, "README.md")


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def section(text, heading):
    """The lines of ``text`` from the ``heading`` line up to the next heading of its level or higher."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading)
    end = len(lines)
    for i in range(start + 1, len(lines)):
        match = re.match(r"(#+) ", lines[i])
        if match and len(match.group(1)) <= level:
            end = i
            break
    return lines[start:end]


def option_tables(lines):
    """The tables in ``lines`` as lists of the option each row names (its first ``--x``)."""
    tables, current = [], None
    for line in lines:
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            match = re.match(r"\| `(--[\w-]+)", line)
            if match:
                current.append(match.group(1))
        else:
            current = None
    return [table for table in tables if table]


def listed(action):
    """An option the README's tables list: not a positional, --help, --version or
    one hidden from --help (a knob for the tests)."""
    return bool(action.option_strings) and action.help != argparse.SUPPRESS and not isinstance(
        action, (argparse._HelpAction, argparse._VersionAction))


def help_groups(parser):
    """The options of each ``--help`` group, in its order (-h and positionals left out)."""
    groups = []
    for group in parser._action_groups:
        options = [action.option_strings[-1] for action in group._group_actions
                   if listed(action)]
        if options:
            groups.append((group.title, options))
    return groups
