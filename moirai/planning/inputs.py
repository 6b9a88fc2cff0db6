"""What a plan is made from, resolved once for every caller: the model, the devices, the profile.

`moirai place`, `moirai serve`, `moirai demo` and the operator describe the same three things on
their own terms (flags, a PlacedModel's pools and profiling Jobs); `resolve` turns them into one
`PlanningInputs`, so `--devices local` means the same devices in `place` and `serve`:

- devices: `local` is this machine (`moirai.devices.local_devices`), its CPU cut into stage
  servers in every way the planner may choose from (`moirai.planning.space.cpu_groupings`), or
  in the one `cpu_devices` asks for (`moirai.planning.cpu.split_cpu`); a path is a devices file;
  a `DeviceSet` is taken as it is (the operator's pools);
- input shapes: `NAME=DIMS` flags or a mapping;
- profile (by default measured where the devices are at hand, `local`, falling back to analytic
  for a model that cannot be timed, `moirai.profile.fallback`; analytic for a devices file):
  `analytic` (roofline, no hardware), `measured` (this machine's devices,
  measured now or taken from the profile cache, with the loopback link between two local stage
  servers; the devices of every device set are timed in turns, so the groupings the planner
  compares met the same load, `moirai.profile.turns`), the path of a profile file from
  `moirai profile` or a `ProfileDocument` (measured on this model with these input shapes), a
  profile document as parsed JSON (the operator's Jobs, which measured the model the operator
  verified), or a `Profile` itself;
- the model, loaded once (`moirai.planning.costgraph.load`) for every later step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moirai.devices import DeviceSet, load_devices, local_devices
from moirai.errors import MoiraiError
from moirai.planning.costgraph import LoadedModel, load
from moirai.planning.cpu import split_cpu
from moirai.planning.space import cpu_groupings
from moirai.profile import Profile

LOCAL = "local"
ANALYTIC, MEASURED = "analytic", "measured"


@dataclass(frozen=True)
class PlanningInputs:
    model: LoadedModel
    device_sets: tuple[DeviceSet, ...]
    """The device sets to choose from: several groupings of this machine's CPU for `local`
    (`moirai.planning.space.cpu_groupings`), else one."""
    profile: Profile

    @property
    def devices(self) -> DeviceSet:
        """The devices, where they are fixed (a devices file, `--cpu-devices`)."""
        if len(self.device_sets) != 1:
            raise MoiraiError("the devices are not fixed: choose one of the device sets")
        return self.device_sets[0]


def parse_input_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    """`NAME=1x3x224x224` (or commas) flags as a mapping."""
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, sep, dims = value.partition("=")
        if name in shapes:
            raise MoiraiError(
                f"--input-shape {name} is given twice ({name}={'x'.join(map(str, shapes[name]))} "
                f"and {value}): give each input once"
            )
        try:
            shapes[name] = [int(d) for d in dims.replace(",", "x").split("x")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise MoiraiError(f"--input-shape {value!r}: write NAME=DIMS, e.g. input=1x3x224x224")
    return shapes


def resolve_devices(
    devices: str | Path | DeviceSet, cpu_devices: int | None = None
) -> tuple[DeviceSet, ...]:
    """`local`, a devices file or a `DeviceSet` (module docstring): the device sets to choose
    from."""
    if isinstance(devices, DeviceSet):
        given = devices
    elif str(devices) == LOCAL:
        local = local_devices()
        return (split_cpu(local, cpu_devices),) if cpu_devices else tuple(cpu_groupings(local))
    else:
        given = load_devices(devices)
    if cpu_devices:
        raise MoiraiError("--cpu-devices applies to --devices local only")
    return (given,)


def default_profile(devices: str | Path | DeviceSet) -> str:
    """Measured where the devices are at hand (`local`), analytic for a description of them."""
    return MEASURED if str(devices) == LOCAL else ANALYTIC


def resolve_profile(
    spec: str | Path | Mapping[str, Any] | Profile | None,
    model: LoadedModel,
    *,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    origin: str = "a profile document",
    device_sets: Sequence[DeviceSet] = (),
    **settings: Any,
) -> Profile:
    """The profile `spec` names (module docstring); `origin` says where a parsed document came
    from; `device_sets` are the devices a `measured` one times in turns; `settings` are
    `moirai.profile.measured.Settings` fields for `measured`."""
    from moirai.profile.analytic import AnalyticProfile
    from moirai.profile.document import DocumentProfile, ProfileDocument

    if spec is None or spec == ANALYTIC:
        return AnalyticProfile()
    if spec == MEASURED:
        from moirai.profile.cache import ProfileCache
        from moirai.profile.measured import MeasuredProfile, Settings
        from moirai.profile.targets import CPU, CUDA, Target
        from moirai.runtime.linkprobe import measure_loopback

        together = {
            Target.of(d)
            for devices in device_sets
            for d in devices.devices
            if d.provider in (CPU, CUDA)
        }

        return MeasuredProfile(
            model.path,
            model.input_shapes,
            settings=Settings(**settings),
            cache=ProfileCache.at(cache_dir),
            link_probe=measure_loopback,
            progress=progress,
            loaded=(model.proto, model.graph, model.sha256),
            together=sorted(together, key=lambda t: t.key),
        )
    if isinstance(spec, Mapping):
        # The operator's profiling Jobs measured the model it fetched and verified itself.
        return DocumentProfile(ProfileDocument.from_dict(dict(spec)), origin=origin)
    if isinstance(spec, ProfileDocument):
        spec.check_model(model.sha256, model.input_shapes)
        return DocumentProfile(spec, origin=origin)
    if isinstance(spec, str | Path):
        return resolve_profile(ProfileDocument.load(spec), model, origin=str(spec))
    return spec


def resolve(
    model_path: str | Path,
    devices: str | Path | DeviceSet = LOCAL,
    *,
    cpu_devices: int | None = None,
    input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    profile: str | Path | Mapping[str, Any] | Profile | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    origin: str = "a profile document",
) -> PlanningInputs:
    """The model, devices and profile of a plan (module docstring); no `profile` means
    `default_profile`. The flags, the devices and a profile file are read before the model
    loads, so a mistake in them fails at once."""
    from moirai.profile.document import ProfileDocument

    device_sets = resolve_devices(devices, cpu_devices)
    defaulted = profile is None
    if profile is None:
        profile = default_profile(devices)
    shapes = (
        dict(input_shapes)
        if isinstance(input_shapes, Mapping)
        else parse_input_shapes(input_shapes or ())
    )
    if isinstance(profile, str | Path) and str(profile) not in (ANALYTIC, MEASURED):
        profile, origin = ProfileDocument.load(profile), str(profile)
    model = load(model_path, shapes)
    chosen = resolve_profile(
        profile,
        model,
        cache_dir=cache_dir,
        progress=progress,
        origin=origin,
        device_sets=device_sets,
    )
    if defaulted and profile == MEASURED:
        from moirai.profile.fallback import MeasuredElseAnalytic
        from moirai.profile.measured import MeasuredProfile

        assert isinstance(chosen, MeasuredProfile)
        chosen = MeasuredElseAnalytic(chosen)
    return PlanningInputs(model, device_sets, chosen)
