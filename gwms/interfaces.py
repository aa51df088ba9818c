"""Every interface a site can swap.

Sites choose implementations by name in their configuration (``[security] methods = [...]``,
``authorizer = "lists"``); a name of the form ``package.module:Class`` loads a site's own plugin.
Methods are declared without ``self``, as zope.interface wants; docstrings say what a Deferred
fires with where a method returns one.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IAuthMethod(Interface):
    """One way for a client to prove who it is to a daemon (x509, token, fs, anonymous, ...).

    The message layer runs every method the same way: the two sides agree on a method in the
    clear, start TLS if the method (or the encryption policy) needs it, the client sends the
    proof returned by ``client_proof``, and the server calls ``authenticate`` with the facts of
    the channel and that proof.
    """

    name = Attribute("The name written in configuration, e.g. 'x509'.")
    requires_tls = Attribute("True if the method only runs inside server-authenticated TLS.")
    wants_client_certificate = Attribute("True if the server must ask for a client certificate.")
    read_only = Attribute("True if the identities it yields may use nothing but READ commands.")
    local_only = Attribute("True if it works only over a local (UNIX socket) channel.")

    def client_can_use(credentials, local):
        """Whether a client holding ``credentials`` (a ClientCredentials) can offer this method
        on a channel that is ``local`` (a UNIX socket) or not."""

    def client_proof(credentials):
        """What the client sends once the channel is set up: a dict of ClassAd-encodable values
        (possibly empty)."""

    def authenticate(channel, proof):
        """Server side: check ``proof`` (a dict) against ``channel`` (a ChannelFacts) and return
        an Identity, or raise AuthenticationFailed with a reason that may be shown to the client."""


class IAuthorizer(Interface):
    """Decides whether an authenticated identity may use an authorization level."""

    def authorize(request):
        """Return a Decision for ``request`` (an AuthorizationRequest: identity, peer address,
        command, level). Must not block; is called once per connection, command and level."""


class IIdentitySwitch(Interface):
    """Decides under which UNIX identity a job's processes run (the seed's gLExec role).

    Stock plugins (``gwms.plugins.identity``): ``none`` runs jobs as the startd's own user;
    ``setuid`` (a root startd) as the local account the job maps to; ``glexec`` behind a helper
    in the gLExec role. A switch starts no process itself: the startd's launcher (one
    small long-lived process per startd, ``gwms.startd.launcher``) starts every job under a
    wrapper of its own (the leader of the job's session, its subreaper) that the starter
    tracks, kills and accounts for, and applies in the job's process what ``launch`` returned:
    a switch cannot take a job out of the starter's sight.

    Optionally a switch has ``check_job(job)``, which the startd calls at claim and activation
    and which raises ``gwms.plugins.identity.IdentityError`` (why) for a job it will not run
    (``prepare_sandbox`` may raise it too); the startd answers ``IDENTITY_REFUSED``."""

    name = Attribute("The name written in configuration, e.g. 'none'.")

    def prepare_sandbox(job, sandbox):
        """Make ``sandbox`` (a Path the starter created) usable by the job's identity; return
        the JobIdentity (uid, gid, user name) the job will run as."""

    def launch(job, argv, env, sandbox):
        """How to start the job: ``argv`` with environment ``env`` in ``sandbox`` (a Path).
        Returns a ``gwms.plugins.identity.LaunchSpec``: the argv and environment to exec (the
        job's, possibly behind a wrapper command of the switch's), and the uid, gid and
        supplementary groups the launcher switches to in the job's child process before it
        enters the sandbox, opens the job's stdin/stdout/stderr and execs (None: keep the
        launcher's). Called once per job, in the startd, on the reactor: must not block."""


class IGridSubmitter(Interface):
    """Submits glideins to one kind of Grid CE or batch system, and follows and removes them.

    The factory loads one per grid kind (``grid = "local"``, ``"slurm"`` or ``"ssh"`` in an
    entry, or a site's ``module:Class``) with ``from_config(config, reactor)`` and calls it for
    every entry of that kind with the entry's configuration (a dict of [factory.entry.NAME],
    with its ``name``). Every call returns a Deferred and must not block the reactor (external
    commands run through ``reactor.spawnProcess``: ``gwms.plugins.commands.run_command``). Calls
    are per entry and in bulk: one status query per entry per cycle, however many glideins it
    has, which is what a batch system can bear. A call that fails (``CommandError``: the batch
    system did not answer) is logged and that entry's cycle stops there; the other entries go
    on. A plugin may have ``stop()``, called (and waited for) when the factory stops.

    A glidein is known by the id the factory gave it (unique, safe as a file name) and by the
    grid id the plugin returned (opaque to the factory; it keeps both in its records, so that a
    restarted factory finds its glideins again)."""

    name = Attribute("The name written in configuration, e.g. 'local'.")

    def submit(entry, glideins):
        """Submit ``glideins`` (a sequence of ``gwms.factory.grid.GlideinSubmission``: the
        glidein id, glidein_startup.sh's arguments, the pilot credential to stage and pass
        with ``-credential``) to the entry. Fires with a dict {glidein id: grid id} of those the
        grid accepted; a glidein missing from it was not submitted (the plugin logs why)."""

    def query(entry, grid_ids):
        """Fires with {grid id: ``gwms.factory.grid.GridStatus``} for ``grid_ids``; an id the
        grid no longer knows is absent from the answer."""

    def remove(entry, grid_ids):
        """Remove those glideins from the grid (running ones are told to stop: a glidein's
        startd gets SIGTERM and lets its jobs go back to their schedds). Fires when the grid
        has accepted the removal."""

    def forget(entry, grid_ids):
        """The factory no longer tracks these finished glideins: clean up what the plugin kept
        for them (scratch directories, output files). Fires when done."""
