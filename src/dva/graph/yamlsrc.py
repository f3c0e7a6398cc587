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
    except yaml.reader.ReaderError as e:
        # Bad characters have a position but no line mark.
        line = text.count("\n", 0, e.position) + 1
        raise YamlSourceError([SourceIssue((), f"YAML: {e.reason} (character "
                                           f"{e.character!r})", line)]) from None
    except yaml.YAMLError as e:
        raise YamlSourceError([_issue(e, "YAML syntax")]) from None
    if node is None:
        return YamlDoc(None, {(): 1})
    loader = yaml.SafeLoader("")
    try:
        lines: dict[Path, int] = {(): node.start_mark.line + 1}
        issues: list[SourceIssue] = []
        _walk(loader, node, (), lines, issues)
        if issues:
            raise YamlSourceError(issues)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise YamlSourceError([_issue(e, "YAML")]) from None
    finally:
        loader.dispose()
    return YamlDoc(data, lines)


def _issue(e: yaml.YAMLError, what: str) -> SourceIssue:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return SourceIssue((), f"{what}: {problem}", mark.line + 1 if mark else None)


def _walk(loader, node, path: Path, lines: dict[Path, int],
          issues: list[SourceIssue]) -> None:
    """Record lines under the keys as the data will hold them (``5:`` is int 5)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for k, v in node.value:
            key = loader.construct_object(k, deep=True)
            try:
                hash(key)
            except TypeError:
                key = str(k.value)
            line = k.start_mark.line + 1
            if key in seen:
                issues.append(SourceIssue(path + (key,), f"duplicate key {key!r} (first on "
                                          f"line {seen[key]})", line))
                continue
            seen[key] = line
            lines[path + (key,)] = line
            _walk(loader, v, path + (key,), lines, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[path + (i,)] = v.start_mark.line + 1
            _walk(loader, v, path + (i,), lines, issues)
