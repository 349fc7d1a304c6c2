"""The two images, checked without a Docker engine: pinned bases, build contexts that hold what
they copy, install steps whose whole requirement set is pinned by the lock (resolved through the
installed metadata of the locked environment), the trainer's entrypoint, and no TensorFlow in
the Airflow image."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
TRAINER = DOCKER / "trainer.Dockerfile"
AIRFLOW = DOCKER / "airflow.Dockerfile"
LOCK = REPO / "requirements" / "lock.txt"
CUDA = DOCKER / "trainer-cuda.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TENSORFLOW_FAMILY = ("tensorflow", "tf-keras", "tf-models-official", "tensorflow-text", "tf-nightly",
                     "tensorflow-cpu", "tensorflow-intel")


# --- a small Dockerfile reader -------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to


def read_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        full = (buffer + line).strip()
        buffer = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not buffer, f"{path.name}: dangling line continuation"
    return out


def declared_args(instructions: list[Instruction], stage: int) -> dict[str, str | None]:
    """Build arguments an ARG declares in one stage (-1: before the first FROM, the only ones a
    FROM line can use): name -> default ("" for ``ARG X=""``), None when it has no default."""
    args: dict[str, str | None] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and ins.stage == stage:
            name, eq, default = ins.args.partition("=")
            args[name.strip()] = (shlex.split(default) or [""])[0] if eq else None
    return args


def from_images(instructions: list[Instruction]) -> list[tuple[str, str | None]]:
    """(image, stage alias) of every FROM, build arguments replaced by their declared defaults
    (what a build without --build-arg uses); an argument without a default stays as ``$NAME``."""
    defaults = {k: v for k, v in declared_args(instructions, -1).items() if v}
    result = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: defaults.get(m[1] or m[2], m[0]), words[0])
            result.append((image, alias))
    return result


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def copies(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    result = []
    for ins in instructions:
        if ins.keyword != "COPY":
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        result.append((words[:-1], words[-1]))
    return result


def pip_install(instructions: list[Instruction]) -> tuple[list[str], list[str]]:
    """(constraint files, requirements) of the RUN that pip-installs the project."""
    found = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", ins.args):
            words = shlex.split(command)
            if "pip" in " ".join(words[:1]) and "install" in words:
                words = words[words.index("install") + 1:]
                constraints, requirements = [], []
                it = iter(words)
                for word in it:
                    if word in ("-c", "--constraint"):
                        constraints.append(next(it))
                    elif word.startswith("-"):
                        continue
                    else:
                        requirements.append(word)
                found.append((constraints, requirements))
    assert len(found) == 1, f"expected one pip install, found {found}"
    return found[0]


def dockerignore_allows(path: Path, rel: str) -> bool:
    """Whether ``rel`` is in the build context under the Dockerfile's own .dockerignore."""
    ignore = path.with_name(path.name + ".dockerignore")
    if not ignore.is_file():
        return True
    allowed = True
    rel = rel.rstrip("/")
    for raw in ignore.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


# --- requirement sets ----------------------------------------------------------------------------

def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = list(req.specifier)
        assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def _env(extra: str) -> dict[str, str]:
    env = dict(default_environment())
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               python_version="3.11", implementation_name="cpython", extra=extra)
    return env


def _applies(req: Requirement, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(_env(e)) for e in ("", *extras))


def project_requirements(extras: Iterable[str]) -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return reqs


def parse_install_args(requirements: list[str]) -> list[Requirement]:
    """Expand ``.[extras]`` into the project's requirements; keep the others."""
    out: list[Requirement] = []
    for word in requirements:
        match = re.fullmatch(r"\.(?:\[(?P<extras>[^\]]*)\])?", word)
        if match:
            extras = [e.strip() for e in (match["extras"] or "").split(",") if e.strip()]
            out += project_requirements(extras)
        else:
            out.append(Requirement(word))
    return out


@dataclass
class Closure:
    versions: dict[str, str]  # every distribution that gets installed -> pinned version
    unpinned: list[str]
    conflicts: list[str]
    not_installed_here: set[str]  # pinned, but absent from this (CPU) environment: not expanded


def resolve_closure(roots: list[Requirement], pins: dict[str, str]) -> Closure:
    """Walk the requirement graph through the installed metadata of the locked environment."""
    versions: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}
    unpinned, conflicts, missing = [], [], set()
    stack = [(r, "install line") for r in roots]
    while stack:
        req, parent = stack.pop()
        name = canonicalize_name(req.name)
        pinned = pins.get(name)
        if pinned is None:
            unpinned.append(f"{req} (required by {parent})")
            continue
        if not req.specifier.contains(pinned, prereleases=True):
            conflicts.append(f"{name}=={pinned} does not satisfy {req} (required by {parent})")
        new_extras = set(req.extras) - extras_seen.get(name, set())
        if name in versions and not new_extras:
            continue
        versions[name] = pinned
        extras_seen.setdefault(name, set()).update(req.extras)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(name)
            continue
        if canonicalize_name(dist.metadata["Name"]) != name or dist.version != pinned:
            conflicts.append(f"{name}: installed {dist.version}, locked {pinned}")
        for text in dist.requires or []:
            child = Requirement(text)
            if _applies(child, extras_seen[name]):
                stack.append((child, f"{name}{sorted(extras_seen[name]) or ''}"))
    return Closure(versions, unpinned, conflicts, missing)


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", [TRAINER, AIRFLOW], ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    instructions = read_dockerfile(dockerfile)
    aliases = {alias for _, alias in from_images(instructions) if alias}
    for image, _ in from_images(instructions):
        if image in aliases:
            continue
        # A build argument is allowed only with a pinned default declared before the first FROM:
        # the build without --build-arg (production's) uses exactly that image.
        assert "$" not in image, f"{dockerfile.name}: base image {image} depends on a build argument without a default"
        name, _, digest = image.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert digest.startswith("sha256:") or re.search(r"\d", tag), \
            f"{dockerfile.name}: base image {image} is not pinned to a version"
        assert tag != "latest"


@pytest.mark.parametrize("dockerfile", [TRAINER, AIRFLOW], ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    for sources, _ in copies(read_dockerfile(dockerfile)):
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
            assert dockerignore_allows(dockerfile, source), \
                f"{dockerfile.name}: COPY {source}: excluded by {dockerfile.name}.dockerignore"
    # ... and the context excludes what must not be sent (the virtualenv, caches).
    assert not dockerignore_allows(dockerfile, ".venv")
    assert not dockerignore_allows(dockerfile, "tasks/__pycache__")


def test_trainer_python_matches_the_project() -> None:
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    images = [image for image, _ in from_images(read_dockerfile(TRAINER))]
    assert any(image.startswith("python:") for image in images), images
    for image in images:
        if image.startswith("python:"):
            version = re.match(r"python:(\d+\.\d+\.\d+)", image)
            assert version and requires.contains(version[1]), f"{image} vs requires-python {requires}"


def test_trainer_build_arguments_leave_nothing_in_the_image() -> None:
    """BASE_IMAGE defaults to the official Python image and is the base of both stages (the venv's
    interpreter is the base image's); PIP_CERT is a build-stage argument only, empty by default, and
    no ENV or COPY carries a CA bundle into any stage."""
    instructions = read_dockerfile(TRAINER)
    raw_froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert raw_froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"], raw_froms
    assert declared_args(instructions, -1) == {"BASE_IMAGE": "python:3.11.13-slim-bookworm"}
    images = [image for image, _ in from_images(instructions)]
    assert images == ["python:3.11.13-slim-bookworm"] * 2

    build_stage, final = 0, max(i.stage for i in instructions)
    assert declared_args(instructions, build_stage) == {"PIP_CERT": ""}
    assert declared_args(instructions, final) == {}
    # Declared right before the install step, so that no earlier step depends on it.
    keywords = [i.keyword for i in instructions if i.stage == build_stage]
    arg_at = [n for n, i in enumerate(i for i in instructions if i.stage == build_stage)
              if i.keyword == "ARG"]
    assert arg_at == [len(keywords) - 2] and keywords[-1] == "RUN", keywords
    for ins in instructions:
        if ins.keyword in ("ENV", "LABEL", "COPY", "ADD"):
            assert not re.search(r"PIP_CERT|REQUESTS_CA_BUNDLE|SSL_CERT|\.crt\b|\.pem\b", ins.args), ins


def test_trainer_install_resolves_entirely_from_the_lock() -> None:
    instructions = read_dockerfile(TRAINER)
    constraints, requirements = pip_install(instructions)
    copied = {src for sources, _ in copies(instructions) for src in sources}
    assert "requirements/lock.txt" in constraints
    for path in constraints:
        assert path in copied, f"constraint file {path} is not copied into the build stage"
    pins: dict[str, str] = {}
    for path in constraints:
        pins.update(read_pins(REPO / path))

    assert any(re.fullmatch(r"\.\[([^\]]*,)?train(,[^\]]*)?\]", r) for r in requirements), requirements
    closure = resolve_closure(parse_install_args(requirements), pins)

    assert closure.unpinned == [], "not pinned by the lock:\n" + "\n".join(closure.unpinned)
    assert closure.conflicts == [], "the pins do not satisfy the requirements:\n" + "\n".join(closure.conflicts)
    # The training stack, at the versions the GUIDE verified.
    assert closure.versions["tensorflow"] == "2.20.0"
    assert closure.versions["tf-models-official"] == "2.20.0"
    assert closure.versions["tf-keras"].startswith("2.20.")
    assert "pycocotools" in closure.versions and "boto3" in closure.versions
    # Only the GPU wheels are absent from this CPU environment; they are pinned all the same.
    assert closure.not_installed_here == {n for n in read_pins(CUDA)}, closure.not_installed_here
    # Nothing from the Airflow side is pulled into the trainer.
    assert "apache-airflow" not in closure.versions


def excluding_python(versions: dict[str, str], python: str) -> set[str]:
    """Distributions (installed here at their locked version) whose Requires-Python excludes ``python``."""
    out = set()
    for name, version in versions.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        requires = dist.metadata.get("Requires-Python")
        if dist.version == version and requires and not SpecifierSet(requires).contains(python):
            out.add(name)
    return out


def install_line_flags(dockerfile: Path) -> set[str]:
    flags = set()
    for ins in read_dockerfile(dockerfile):
        if ins.keyword == "RUN" and re.search(r"pip\s+install", ins.args):
            flags |= {w for w in shlex.split(ins.args) if w.startswith("--")}
    return flags


@pytest.mark.parametrize("dockerfile", [TRAINER, AIRFLOW], ids=lambda p: p.name)
def test_pip_in_the_image_accepts_every_locked_requires_python(dockerfile: Path) -> None:
    """The lock is resolved by uv, which ignores upper bounds of Requires-Python; pip in the image
    does not. The trainer installs with --ignore-requires-python for the one known case (a 3.10
    backport that 3.11 does not need); anything else, or any such package in the Airflow image,
    fails here rather than in a build."""
    instructions = read_dockerfile(dockerfile)
    constraints, requirements = pip_install(instructions)
    pins: dict[str, str] = {}
    for path in constraints:
        pins.update(read_pins(REPO / path))
    closure = resolve_closure(parse_install_args(requirements), pins)
    images = [image for image, _ in from_images(instructions)]
    python = re.search(r"python:?(\d+\.\d+(?:\.\d+)?)", images[-1])[1]
    excluded = excluding_python(closure.versions, python)
    if dockerfile == TRAINER:
        assert excluded == {"backports-strenum"}, f"locked packages that exclude Python {python}: {excluded}"
        assert "--ignore-requires-python" in install_line_flags(dockerfile)
    else:
        assert excluded == set(), f"pip in {dockerfile.name} refuses {excluded} on Python {python}"
        assert "--ignore-requires-python" not in install_line_flags(dockerfile)


def _cli_imports() -> dict[str, set[tuple[str, bool]]]:
    """Third-party top-level modules imported by ``tasks.cli`` and every project module it reaches,
    each with (importing project module, whether at module level). Imports inside functions count
    too; imports guarded by ``except ImportError`` are optional and left out."""
    def module_file(name: str) -> Path | None:
        base = REPO / name.replace(".", "/")
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def guarded(tree: ast.AST) -> set[int]:
        ids = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers):
                ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        return ids

    found: dict[str, set[tuple[str, bool]]] = {}
    seen: set[str] = set()
    stack = ["tasks.cli"]
    while stack:
        name = stack.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        tree = ast.parse(path.read_text())
        optional = guarded(tree)
        module_level = {id(n) for n in tree.body}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    targets = [f"{base}.{node.module}" if node.module else base]
                else:
                    targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                top = target.partition(".")[0]
                if top in ("tasks", "data_checks"):
                    stack.append(target)
                elif top not in sys.stdlib_module_names and top != "__future__" and id(node) not in optional:
                    found.setdefault(top, set()).add((name, id(node) in module_level))
    return found


def test_the_trainer_install_provides_every_module_the_cli_imports() -> None:
    """What `personcar` imports in the trainer image must come from the trainer's install line, not
    from packages that only the development environment (with Airflow) happens to have. Airflow
    itself may only be imported inside functions (the DAG-side helpers, which the CLI never calls)."""
    instructions = read_dockerfile(TRAINER)
    constraints, requirements = pip_install(instructions)
    pins: dict[str, str] = {}
    for path in constraints:
        pins.update(read_pins(REPO / path))
    installed = set(resolve_closure(parse_install_args(requirements), pins).versions)
    providers = metadata.packages_distributions()
    imports = _cli_imports()
    assert {"tensorflow", "official", "pycocotools", "great_expectations"} <= set(imports)  # the walk works
    at_module_level = sorted(m for m, top in imports.pop("airflow", set()) if top)
    assert at_module_level == [], f"the CLI cannot start without Airflow: imported at module level by {at_module_level}"
    missing = {module: sorted(m for m, _ in importers) for module, importers in imports.items()
               if not {canonicalize_name(d) for d in providers.get(module, [])} & installed}
    assert missing == {}, f"imported by the CLI but not installed in the trainer image: {missing}"


def test_cuda_pins_are_tensorflows_own_cuda_requirements() -> None:
    tensorflow = metadata.distribution("tensorflow")
    and_cuda = {}
    for text in tensorflow.requires or []:
        req = Requirement(text)
        if req.marker and req.marker.evaluate(_env("and-cuda")) and not req.marker.evaluate(_env("")):
            and_cuda[canonicalize_name(req.name)] = req.specifier
    pins = read_pins(CUDA)
    assert set(pins) == set(and_cuda)
    for name, version in pins.items():
        assert and_cuda[name].contains(version), f"{name}=={version} outside tensorflow's {and_cuda[name]}"
    # The install line asks for exactly the TensorFlow the lock pins, with its CUDA extra.
    _, requirements = pip_install(read_dockerfile(TRAINER))
    tf = [Requirement(r) for r in requirements if r.startswith("tensorflow")]
    assert [(r.name, r.extras, str(r.specifier)) for r in tf] == [("tensorflow", {"and-cuda"}, "==2.20.0")]
    assert read_pins(LOCK)["tensorflow"] == "2.20.0"


def test_trainer_entrypoint_is_the_cli() -> None:
    import yaml

    from tasks.k8s import CLI, DEFAULT_TEMPLATES

    uids = {yaml.safe_load((DEFAULT_TEMPLATES / n).read_text())["spec"]["securityContext"]["runAsUser"]
            for n in ("trainer-gpu.yaml", "trainer-cpu.yaml")}
    (TRAINER_UID,) = uids  # the pod templates run the image's user

    last = final_stage(read_dockerfile(TRAINER))
    (entrypoint,) = [i.args for i in last if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == [CLI] == ["personcar"]  # exec form: signals reach the CLI
    # The console script the entrypoint runs, and the function behind it.
    target = PYPROJECT["project"]["scripts"]["personcar"]
    assert target == "tasks.cli:main"
    module, _, function = target.partition(":")
    source = REPO / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"{source} (the image's entrypoint) does not exist"
    defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert function in defined
    # Runtime settings: legacy Keras for Model Garden, a numeric non-root user matching the pod.
    env_text = " ".join(i.args for i in last if i.keyword == "ENV")
    assert re.search(r"\bTF_USE_LEGACY_KERAS=1\b", env_text)
    (user,) = [i.args for i in last if i.keyword == "USER"]
    assert user.split(":")[0] == str(TRAINER_UID) != "0"


def test_airflow_image_matches_the_pins_and_has_no_tensorflow() -> None:
    instructions = read_dockerfile(AIRFLOW)
    ((image, _),) = from_images(instructions)
    airflow_pin = {Requirement(r).name: str(Requirement(r).specifier)
                   for r in PYPROJECT["project"]["optional-dependencies"]["airflow"]}["apache-airflow"]
    assert image == f"apache/airflow:{airflow_pin.lstrip('=')}-python3.11"

    constraints, requirements = pip_install(instructions)
    assert constraints == ["requirements/lock.txt"]
    project = [r for r in requirements if r.startswith(".")]
    assert project == [".[airflow]"], "the Airflow image installs the project with the airflow extra only"
    closure = resolve_closure(parse_install_args(requirements), read_pins(LOCK))
    assert closure.unpinned == [], "\n".join(closure.unpinned)
    assert closure.conflicts == [], "\n".join(closure.conflicts)
    assert closure.not_installed_here == set()
    assert closure.versions["apache-airflow"] == airflow_pin.lstrip("=")
    assert "apache-airflow-providers-cncf-kubernetes" in closure.versions
    heavy = sorted(n for n in closure.versions if n in TENSORFLOW_FAMILY or n.startswith("nvidia-"))
    assert heavy == [], f"the Airflow image would install {heavy}"

    # The DAGs and plugins land where the image's Airflow looks for them.
    destinations = {tuple(src): dst for src, dst in copies(instructions)}
    assert destinations[("dags/",)] == "/opt/airflow/dags/"
    assert destinations[("plugins/",)] == "/opt/airflow/plugins/"
