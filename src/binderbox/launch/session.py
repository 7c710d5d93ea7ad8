"""Launching one session: a throwaway user, a fresh token, progress, retries."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from binderbox.errors import BinderboxError
from binderbox.events import Emit, Event
from binderbox.launch.client import HubClient, HubError, SpawnFailed, SpawnRejected
from binderbox.launch.options import InvalidSessionOptions

_USER_PREFIX = re.compile(r"[a-z][a-z0-9-]{0,39}")


class LaunchFailed(BinderboxError):
    """No session could be started; the message says why."""


@dataclass(frozen=True)
class Session:
    """A running session: its hub user, its public base URL (ending in ``/``), its token."""

    user: str
    url: str
    token: str


async def launch(
    client: HubClient,
    image: str,
    *,
    binder_env: Mapping[str, str] | None = None,
    retries: int = 3,
    emit: Emit | None = None,
    user_prefix: str = "binder",
) -> Session:
    """Start a session from ``image`` for a new throwaway user, with a fresh random token.

    Each progress message of the hub is passed to ``emit`` as a ``launching`` event. A
    failed start is tried again with a new user, up to ``retries`` attempts in all, each
    retry's message giving the reason; then LaunchFailed is raised with the last reason.
    Refusals that cannot change (an image that is not allowed or not built) fail at once.
    A cancelled launch deletes its user.
    """
    if not _USER_PREFIX.fullmatch(user_prefix):
        raise ValueError(f"user_prefix {user_prefix!r} must be lowercase letters, digits, '-'")
    attempts = max(1, retries)

    def say(message: str, **fields: object) -> None:
        if emit is not None:
            emit(Event("launching", message, dict(fields)))

    reason = ""
    for attempt in range(1, attempts + 1):
        user = f"{user_prefix}-{secrets.token_hex(6)}"
        token = secrets.token_hex(24)
        try:
            await client.create_user(user)
            steps = client.start_server(user, image, token, binder_env)
            async with contextlib.aclosing(steps):
                async for step in steps:
                    if step.ready:
                        return Session(user, client.url_for(step.url), token)
                    say(step.message, **({"progress": step.progress} if step.progress else {}))
            raise SpawnFailed("The hub ended the start without a ready server.")
        except (SpawnRejected, InvalidSessionOptions) as error:
            await _discard(client, user)
            raise LaunchFailed(f"The session cannot start: {error.message}") from None
        except HubError as error:
            # SpawnFailed, or the hub misbehaving (including being briefly unreachable).
            await _discard(client, user)
            reason = error.message
            if attempt < attempts:
                say(f"Starting the session failed (attempt {attempt} of {attempts}): {reason}")
                await asyncio.sleep(attempt)
        except BaseException:
            # Cancelled (the browser went away) or a bug: leave no user or container behind.
            await _discard(client, user)
            raise
    raise LaunchFailed(f"The session did not start after {attempts} attempts. {reason}")


async def _discard(client: HubClient, user: str) -> None:
    """Delete a user whose launch failed, even while the launch is being cancelled."""
    task = asyncio.ensure_future(client.delete_user(user))
    with contextlib.suppress(BinderboxError, asyncio.CancelledError):
        await asyncio.shield(task)


class HubLauncher:
    """Launches sessions on a hub as a stream of events (what the service's /build sends).

    ``launch`` yields ``launching`` events, then one ``ready`` event with ``url``,
    ``token`` and ``user``; a failure raises LaunchFailed.
    """

    def __init__(self, client: HubClient, *, retries: int = 3) -> None:
        self.client = client
        self.retries = retries

    async def healthy(self) -> bool:
        return await self.client.healthy()

    async def running_images(self) -> list[str]:
        return await self.client.running_images()

    async def running_sessions(self) -> list[tuple[str, str]]:
        return await self.client.running_sessions()

    async def launch(
        self, image: str, binder_env: Mapping[str, str] | None = None
    ) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        task = asyncio.create_task(
            launch(
                self.client,
                image,
                binder_env=binder_env,
                retries=self.retries,
                emit=queue.put_nowait,
            )
        )
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            session = task.result()
            yield Event(
                "ready",
                f"Server ready at {session.url}",
                {"url": session.url, "token": session.token, "user": session.user},
            )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, BinderboxError):
                    await task
