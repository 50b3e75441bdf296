"""The environment a limited command runs in (real processes: the runner starts `sh`)."""

from __future__ import annotations

from domain.core.runner import BASE_ENV, Limits, Runner

PRINT_ARENAS = ["sh", "-c", 'printf "%s" "${MALLOC_ARENA_MAX-unset}"']


def test_a_command_under_an_address_space_limit_gets_few_malloc_arenas() -> None:
    # Given a limit on the address space
    limited = Runner().run(PRINT_ARENAS, limits=Limits(address_space_bytes=2**30))
    # Then the command runs with glibc's arenas capped, so the limit measures what it allocates
    assert limited.stdout == "2"


def test_other_commands_keep_the_runners_environment() -> None:
    # A CPU limit alone, or no limit, adds nothing
    assert Runner().run(PRINT_ARENAS, limits=Limits(cpu_seconds=30)).stdout == "unset"
    assert Runner().run(PRINT_ARENAS).stdout == "unset"
    # And a runner that sets the variable itself keeps its own value
    own = Runner(env={**BASE_ENV, "MALLOC_ARENA_MAX": "1"})
    assert own.run(PRINT_ARENAS, limits=Limits(address_space_bytes=2**30)).stdout == "1"
