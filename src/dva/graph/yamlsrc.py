"""YAML loading that remembers where every value came from.

PyYAML silently keeps the last of two equal keys; an appliance file with a device
defined twice must be an error instead. This loader composes the node tree, rejects
duplicate keys, records the line of every mapping key and sequence item under its
document path (``("devices", "r1", "ports")``), then builds plain Python data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

Path = tuple[str | int, ...]


@dataclass
class SourceIssue:
    path: Path
    message: str
    line: int | None = None


@dataclass
class YamlDoc:
    data: object
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int | None:
        """Line of the deepest known prefix of ``path`` (1-based)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)


class YamlSourceError(ValueError):
    def __init__(self, issues: list[SourceIssue]) -> None:
        super().__init__("; ".join(i.message for i in issues))
        self.issues = issues


def load_yaml(text: str) -> YamlDoc:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise YamlSourceError([SourceIssue((), f"YAML syntax: {problem}", line)]) from None
    if node is None:
        return YamlDoc(None, {(): 1})
    lines: dict[Path, int] = {(): node.start_mark.line + 1}
    issues: list[SourceIssue] = []
    _walk(node, (), lines, issues)
    if issues:
        raise YamlSourceError(issues)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise YamlSourceError([SourceIssue((), f"YAML: {getattr(e, 'problem', e)}",
                                           mark.line + 1 if mark else None)]) from None
    finally:
        loader.dispose()
    return YamlDoc(data, lines)


def _walk(node, path: Path, lines: dict[Path, int], issues: list[SourceIssue]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            line = k.start_mark.line + 1
            if key in seen:
                issues.append(SourceIssue(path + (key,), f"duplicate key {key!r} (first on "
                                          f"line {seen[key]})", line))
                continue
            seen[key] = line
            lines[path + (key,)] = line
            _walk(v, path + (key,), lines, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[path + (i,)] = v.start_mark.line + 1
            _walk(v, path + (i,), lines, issues)
