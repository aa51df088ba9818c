"""gwms.submit: submit description files (the condor_submit language) to job ads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwms import classads, submit
from gwms.submit import (
    SubmitError,
    format_environment,
    join_arguments,
    parse_environment,
    parse_submit,
    split_arguments,
)

IWD = Path("/home/alice/run")
NOW = 1_700_000_000


def parse(text: str, **kwargs: object) -> submit.SubmitResult:
    options: dict[str, object] = {"filename": "job.sub", "cluster_id": 42, "owner": "alice", "iwd": IWD, "now": NOW}
    options.update(kwargs)
    return parse_submit(text, **options)  # type: ignore[arg-type]


def jobs(text: str, **kwargs: object) -> list[classads.ClassAd]:
    return parse(text, **kwargs).job_ads()


def job(text: str, **kwargs: object) -> classads.ClassAd:
    ads = jobs(text, **kwargs)
    assert len(ads) == 1
    return ads[0]


def value(ad: classads.ClassAd, name: str) -> object:
    return classads.evaluate(ad, name)


def text_of(ad: classads.ClassAd, name: str) -> str:
    """An attribute's ClassAd text (for expressions)."""
    return repr(ad.lookup(name))


def fails(text: str, **kwargs: object) -> SubmitError:
    with pytest.raises(SubmitError) as info:
        parse(text, **kwargs)
    return info.value


EXE = "executable = /bin/echo\n"


# ---------------------------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------------------------


def test_comments_and_blank_lines_are_ignored() -> None:
    ad = job("# a comment\n\n   # indented comment\n" + EXE + "\n\t\n# arguments = nope\nqueue\n")
    assert value(ad, "Arguments") == ""


def test_hash_inside_a_value_is_not_a_comment() -> None:
    assert split_arguments(value(job(EXE + "arguments = a #b\nqueue"), "Arguments")) == ["a", "#b"]


def test_backslash_continues_a_line() -> None:
    ad = job(EXE + "arguments = one \\\n    two \\\n three\nqueue\n")
    assert split_arguments(value(ad, "Arguments")) == ["one", "two", "three"]


def test_continuation_joins_without_space_when_none_is_written() -> None:
    assert value(job(EXE + "output = out\\\nfile\nqueue"), "Out") == "outfile"


def test_comment_line_inside_a_continuation_is_skipped() -> None:
    ad = job(EXE + "arguments = one \\\n# not this\n two\nqueue")
    assert split_arguments(value(ad, "Arguments")) == ["one", "two"]


def test_line_numbers_after_a_continuation_count_physical_lines() -> None:
    e = fails(EXE + "arguments = a \\\n b\nbogus_thing = 1\nqueue")
    assert e.line == 4


def test_commands_are_case_insensitive() -> None:
    ad = job("EXECUTABLE = /bin/echo\nArguments = x\nRequest_Memory = 3\nQUEUE\n")
    assert value(ad, "Cmd") == "/bin/echo"
    assert value(ad, "RequestMemory") == 3


def test_white_space_around_equals_and_values_is_trimmed() -> None:
    ad = job("executable=/bin/echo\n  output   =   out.txt   \nqueue")
    assert value(ad, "Out") == "out.txt"


def test_crlf_line_endings() -> None:
    ad = job("executable = /bin/echo\r\noutput = o\r\nqueue\r\n")
    assert value(ad, "Out") == "o"


def test_later_command_overrides_earlier() -> None:
    assert value(job(EXE + "output = a\noutput = b\nqueue"), "Out") == "b"


# ---------------------------------------------------------------------------------------------
# Attributes and defaults
# ---------------------------------------------------------------------------------------------


def test_minimal_job_has_htcondor_attributes_and_defaults() -> None:
    ad = job("executable = run.sh\nqueue\n")
    expected = {
        "ClusterId": 42,
        "ProcId": 0,
        "Owner": "alice",
        "Cmd": "/home/alice/run/run.sh",
        "Arguments": "",
        "Environment": "",
        "Iwd": "/home/alice/run",
        "In": "/dev/null",
        "Out": "/dev/null",
        "Err": "/dev/null",
        "ShouldTransferFiles": "IF_NEEDED",
        "WhenToTransferOutput": "ON_EXIT",
        "RequestCpus": 1,
        "RequestMemory": 128,
        "RequestDisk": 1048576,
        "Rank": 0.0,
        "PeriodicHold": False,
        "PeriodicRelease": False,
        "PeriodicRemove": False,
        "JobUniverse": 5,
        "JobStatus": 1,
        "NumJobStarts": 0,
        "JobRunCount": 0,
        "QDate": NOW,
        "EnteredCurrentStatus": NOW,
        "GetEnv": False,
        "JobLeaseDuration": 2400,
        "JobNotification": 0,
        "MyType": "Job",
        "TargetType": "Machine",
    }
    for name, want in expected.items():
        assert value(ad, name) == want, name
    assert type(value(ad, "Rank")) is float
    assert "UserLog" not in ad and "x509userproxy" not in ad and "TransferInput" not in ad
    assert set(ad) == set(expected) | {"Requirements"}


def test_now_defaults_to_the_clock() -> None:
    before = int(time.time())
    ad = parse_submit(EXE + "queue", cluster_id=1, owner="a", iwd=IWD).job_ads()[0]
    assert before <= value(ad, "QDate") <= int(time.time()) + 1


@pytest.mark.parametrize(
    ("line", "attribute", "expected"),
    [
        ("input = in.txt", "In", "in.txt"),
        ("output = out.txt", "Out", "out.txt"),
        ("error = err.txt", "Err", "err.txt"),
        ("transfer_input_files = a.dat, b.dat ,c.dat", "TransferInput", "a.dat,b.dat,c.dat"),
        ("transfer_output_files = results/,log.txt", "TransferOutput", "results/,log.txt"),
        ("should_transfer_files = yes", "ShouldTransferFiles", "YES"),
        ("should_transfer_files = IF_NEEDED", "ShouldTransferFiles", "IF_NEEDED"),
        ("when_to_transfer_output = on_exit_or_evict", "WhenToTransferOutput", "ON_EXIT_OR_EVICT"),
        ("request_cpus = 8", "RequestCpus", 8),
        ("getenv = true", "GetEnv", True),
        ("getenv = False", "GetEnv", False),
        ("notification = Complete", "JobNotification", 2),
        ("notification = always", "JobNotification", 1),
        ("notification = error", "JobNotification", 3),
        ("notification = never", "JobNotification", 0),
        ("job_lease_duration = 600", "JobLeaseDuration", 600),
        ("delegate_job_GSI_credentials_lifetime = 3600", "DelegateJobGSICredentialsLifetime", 3600),
        ("DELEGATE_JOB_GSI_CREDENTIALS_LIFETIME = 0", "DelegateJobGSICredentialsLifetime", 0),
        ("delegate_limited_proxy = true", "DelegateLimitedProxy", True),
        ("delegate_limited_proxy = no", "DelegateLimitedProxy", False),
        ("universe = vanilla", "JobUniverse", 5),
        ("universe = VANILLA", "JobUniverse", 5),
        ("+ProjectName = \"cms\"", "ProjectName", "cms"),
        ("MY.DESIRED_Sites = \"T2_US_A,T2_US_B\"", "DESIRED_Sites", "T2_US_A,T2_US_B"),
        ("+MaxWallTimeMins = 60 * 2", "MaxWallTimeMins", 120),
    ],
)
def test_command_sets_attribute(line: str, attribute: str, expected: object) -> None:
    ad = job(f"{EXE}{line}\nqueue\n")
    assert value(ad, attribute) == expected


def test_should_transfer_files_no_omits_when_to_transfer_output() -> None:
    ad = job(EXE + "should_transfer_files = NO\nqueue")
    assert value(ad, "ShouldTransferFiles") == "NO"
    assert "WhenToTransferOutput" not in ad


def test_when_to_transfer_output_with_no_transfer_is_an_error() -> None:
    e = fails(EXE + "should_transfer_files = NO\nwhen_to_transfer_output = ON_EXIT\nqueue")
    assert e.line == 3 and "should_transfer_files = NO" in str(e)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("should_transfer_files = sometimes", "YES, NO, IF_NEEDED"),
        ("when_to_transfer_output = ON_SUCCESS", "ON_EXIT, ON_EXIT_OR_EVICT"),
        ("notification = often", "NEVER"),
        ("getenv = maybe", "true or false"),
        ("job_lease_duration = soon", "integer"),
        ("job_lease_duration = -5", "out of range"),
        ("job_lease_duration = " + "1" * 5000, "out of range"),
        ("delegate_job_GSI_credentials_lifetime = soon", "integer"),
        ("delegate_job_GSI_credentials_lifetime = 1h", "integer"),
        ("delegate_job_GSI_credentials_lifetime = 3600.5", "integer"),
        ("delegate_job_GSI_credentials_lifetime = -1", "out of range"),
        ("delegate_job_GSI_credentials_lifetime = 99999999999999999999", "out of range"),
        ("delegate_limited_proxy = limited", "true or false"),
    ],
)
def test_bad_enumerated_values_are_errors(line: str, words: str) -> None:
    e = fails(f"{EXE}{line}\nqueue")
    assert e.line == 2 and words in str(e)


def test_executable_relative_to_submit_directory_absolute_kept() -> None:
    assert value(job("executable = bin/x\nqueue"), "Cmd") == "/home/alice/run/bin/x"
    assert value(job("executable = /usr/bin/x\nqueue"), "Cmd") == "/usr/bin/x"


def test_initialdir_sets_iwd_and_relative_paths_but_not_cmd() -> None:
    ad = job("executable = bin/x\ninitialdir = data/1\nlog = job.log\nx509userproxy = proxy.pem\nqueue")
    assert value(ad, "Iwd") == "/home/alice/run/data/1"
    assert value(ad, "UserLog") == "/home/alice/run/data/1/job.log"
    assert value(ad, "x509userproxy") == "/home/alice/run/data/1/proxy.pem"
    assert value(ad, "Cmd") == "/home/alice/run/bin/x"  # condor_submit: the submit directory


def test_absolute_initialdir_log_and_proxy() -> None:
    ad = job(EXE + "initialdir = /scratch/a\nlog = /var/log/j.log\nx509userproxy = /tmp/x509up_u1\nqueue")
    assert value(ad, "Iwd") == "/scratch/a"
    assert value(ad, "UserLog") == "/var/log/j.log"
    assert value(ad, "x509userproxy") == "/tmp/x509up_u1"


def test_delegation_commands_are_recorded_only_when_given() -> None:
    ad = job(EXE + "x509userproxy = /tmp/x509up_u1\nqueue")
    assert "DelegateJobGSICredentialsLifetime" not in ad and "DelegateLimitedProxy" not in ad  # 24 h, full


@pytest.mark.parametrize("line", ["+x509UserProxySubject = \"/CN=root\"", "MY.x509userproxyexpiration = 9",
                                  "+DelegateLimitedProxy = false", "+DelegateJobGSICredentialsLifetime = 5"])
def test_proxy_attributes_cannot_be_set_directly(line: str) -> None:
    e = fails(f"{EXE}{line}\nqueue")
    assert e.line == 2 and "cannot be set" in str(e)


def test_log_is_absolute_against_iwd() -> None:
    assert value(job(EXE + "log = logs/job.log\nqueue"), "UserLog") == "/home/alice/run/logs/job.log"


def test_empty_value_means_default() -> None:
    ad = job(EXE + "output =\nrequest_memory =\nqueue")
    assert value(ad, "Out") == "/dev/null"
    assert value(ad, "RequestMemory") == 128


@pytest.mark.parametrize("universe", ["grid", "docker", "local", "scheduler", "standard", "java", "vm"])
def test_only_vanilla_universe(universe: str) -> None:
    e = fails(f"{EXE}universe = {universe}\nqueue")
    assert e.line == 2 and "only the vanilla universe is supported" in str(e)


# ---------------------------------------------------------------------------------------------
# Resource requests and expressions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("2048", 2048),
        ("2GB", 2048),
        ("2 GB", 2048),
        ("1G", 1024),
        ("512MB", 512),
        ("512M", 512),
        ("512mb", 512),
        ("1.5G", 1536),
        ("1024K", 1),
        ("1K", 1),  # rounded up, as HTCondor does
        ("1T", 1024 * 1024),
        ("0", 0),
    ],
)
def test_request_memory_units(text: str, mib: int) -> None:
    assert value(job(f"{EXE}request_memory = {text}\nqueue"), "RequestMemory") == mib


@pytest.mark.parametrize(
    ("text", "kib"),
    [
        ("1024", 1024),  # no unit: KiB, as in HTCondor
        ("40GB", 40 * 1024 * 1024),
        ("1M", 1024),
        ("1 MB", 1024),
        ("10K", 10),
        ("2.5K", 3),
    ],
)
def test_request_disk_units(text: str, kib: int) -> None:
    assert value(job(f"{EXE}request_disk = {text}\nqueue"), "RequestDisk") == kib


def test_request_memory_expression_kept_as_expression() -> None:
    ad = job(EXE + "request_memory = ifThenElse(MemoryUsage =!= undefined, MemoryUsage, 256)\nqueue")
    assert "MemoryUsage" in text_of(ad, "RequestMemory")
    assert value(ad, "RequestMemory") == 256


@pytest.mark.parametrize(
    "line",
    [
        "request_memory = 12XB",
        "request_memory = -1",
        "request_memory = 2 G B",
        "request_disk = 1.2.3",
        "request_cpus = 2K",
        "request_cpus = -4",
        "request_memory = 99999999999999T",
        "request_memory = " + "9" * 5000,
        "request_cpus = " + "9" * 5000,
    ],
)
def test_bad_numbers_in_requests(line: str) -> None:
    e = fails(f"{EXE}{line}\nqueue")
    assert e.line == 2 and "bad number" in str(e) and e.filename == "job.sub"


def test_requirements_combine_user_expression_with_resource_clauses() -> None:
    ad = job(EXE + "requirements = TARGET.GLIDEIN_Site == \"Site_A\" // a comment\nqueue")
    req = text_of(ad, "Requirements")
    assert req.startswith('(TARGET.GLIDEIN_Site == "Site_A") && ')
    for clause in ("TARGET.Cpus >= RequestCpus", "TARGET.Memory >= RequestMemory", "TARGET.Disk >= RequestDisk", 'TARGET.OpSys == "LINUX"'):
        assert clause in req


def test_requirements_default_is_the_resource_clauses() -> None:
    req = text_of(job(EXE + "queue"), "Requirements")
    assert req == '(TARGET.Cpus >= RequestCpus) && (TARGET.Memory >= RequestMemory) && (TARGET.Disk >= RequestDisk) && (TARGET.OpSys == "LINUX")'


@pytest.mark.parametrize("user", ['OpSys == "WINDOWS"', 'TARGET.OpSysAndVer == "AlmaLinux9"', 'target.opsys =!= undefined'])
def test_requirements_mentioning_opsys_get_no_opsys_clause(user: str) -> None:
    assert '"LINUX"' not in text_of(job(f"{EXE}requirements = {user}\nqueue"), "Requirements")


def test_opsys_inside_a_string_is_not_a_mention() -> None:
    assert 'TARGET.OpSys == "LINUX"' in text_of(job(EXE + 'requirements = Name == "OpSys"\nqueue'), "Requirements")


def test_requirements_match_a_slot() -> None:
    ad = job(EXE + "request_memory = 2GB\nrequest_cpus = 2\nrequirements = TARGET.HasFoo\nqueue")
    slot = classads.parse_new('[Cpus = 4; Memory = 4096; Disk = 10000000; OpSys = "LINUX"; HasFoo = true; Requirements = true]')
    small = classads.parse_new('[Cpus = 4; Memory = 1024; Disk = 10000000; OpSys = "LINUX"; HasFoo = true; Requirements = true]')
    assert classads.symmetric_match(ad, slot)
    assert not classads.symmetric_match(ad, small)


@pytest.mark.parametrize(
    ("command", "attribute"),
    [
        ("rank", "Rank"),
        ("periodic_hold", "PeriodicHold"),
        ("periodic_release", "PeriodicRelease"),
        ("periodic_remove", "PeriodicRemove"),
        ("periodic_hold_reason", "PeriodicHoldReason"),
        ("periodic_hold_subcode", "PeriodicHoldSubCode"),
    ],
)
def test_policy_expressions(command: str, attribute: str) -> None:
    ad = job(f"{EXE}{command} = (time() - QDate) > 3600 && JobStatus == 1\nqueue")
    assert text_of(ad, attribute) == "(time() - QDate) > 3600 && JobStatus == 1"


def test_periodic_hold_reason_and_subcode_values() -> None:
    ad = job(EXE + 'periodic_hold_reason = strcat("too long: ", Owner)\nperiodic_hold_subcode = 42\nqueue')
    assert value(ad, "PeriodicHoldReason") == "too long: alice"
    assert value(ad, "PeriodicHoldSubCode") == 42


@pytest.mark.parametrize(
    "line",
    [
        "requirements = Memory >",
        "rank = (Memory",
        "periodic_hold = a b",
        "periodic_release = 1 +",
        "periodic_remove = \"unterminated",
        "periodic_hold_reason = )",
        "periodic_hold_subcode = [",
        "+Foo = 1 2",
        "MY.Bar = ((",
        '+Bad = "\\377"',
    ],
)
def test_bad_expressions_quote_the_classad_message(line: str) -> None:
    e = fails(f"{EXE}{line}\nqueue")
    assert e.line == 2
    assert "expression" in str(e)
    assert e.reason != ""


def test_bad_requirements_message_comes_from_classads() -> None:
    e = fails(EXE + "requirements = Memory >\nqueue")
    try:
        classads.parse_expr("Memory >")
    except classads.ClassAdError as ce:
        assert str(ce) in str(e)


def test_custom_attribute_names() -> None:
    ad = job(EXE + "+ A_b1 = 1\nmy.CamelCase = true\nqueue")
    assert value(ad, "A_b1") == 1 and value(ad, "CamelCase") is True


@pytest.mark.parametrize("line", ["+ = 1", "+1abc = 1", "+a-b = 1", "MY. = 2", "+x.y = 3"])
def test_invalid_custom_attribute_names(line: str) -> None:
    assert fails(f"{EXE}{line}\nqueue").line == 2


def test_custom_attribute_needs_a_value() -> None:
    assert "missing value" in str(fails(EXE + "+Foo =\nqueue"))


@pytest.mark.parametrize(("line", "hint"), [("+RequestMemory = 5", "request_memory"), ("+ProcId = 3", "set by gwms"), ("MY.Cmd = \"x\"", "executable")])
def test_custom_attributes_cannot_override_computed_ones(line: str, hint: str) -> None:
    e = fails(f"{EXE}{line}\nqueue")
    assert e.line == 2 and hint in str(e)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

ARGUMENT_CASES = [
    # old syntax
    ("a b c", ["a", "b", "c"]),
    ("  a \t b  ", ["a", "b"]),
    ("one \\\"two\\\" 'three'", ["one", '"two"', "'three'"]),  # the manual's example
    ("it's", ["it's"]),
    ("back\\slash", ["back\\slash"]),
    ("", []),
    # new syntax
    ('"3 simple arguments"', ["3", "simple", "arguments"]),
    ("\"one 'two with spaces' 3\"", ["one", "two with spaces", "3"]),
    ("\"one \"\"two\"\" 'spacey ''quoted'' argument'\"", ["one", '"two"', "spacey 'quoted' argument"]),  # manual
    ('"a\\b"', ["a\\b"]),  # no backslash escapes in the new syntax
    ("\"''\"", [""]),
    ("\"a '' b\"", ["a", "", "b"]),
    ("\"x''y\"", ["xy"]),
    ("\"'it''s'\"", ["it's"]),
    ('""', []),
    ('"   "', []),
    ("\"'\t'\"", ["\t"]),
]


@pytest.mark.parametrize(("given", "argv"), ARGUMENT_CASES)
def test_arguments_syntaxes(given: str, argv: list[str]) -> None:
    ad = job(f"{EXE}arguments = {given}\nqueue")
    assert split_arguments(value(ad, "Arguments")) == argv


@pytest.mark.parametrize(
    ("given", "v2"),
    [
        ("a b", "a b"),
        ('"a \'b c\'"', "a b' 'c"),  # HTCondor quotes just the white space (append_arg)
        ("\"'it''s'\"", "it''''s"),
        ("\"''\"", "''"),
        ('one \\"two\\"', 'one "two"'),
    ],
)
def test_arguments_attribute_is_htcondor_v2_syntax(given: str, v2: str) -> None:
    assert value(job(f"{EXE}arguments = {given}\nqueue"), "Arguments") == v2


@pytest.mark.parametrize(
    "given",
    [
        '"unterminated',
        "\"a 'b\"",
        '"a" b',
        'say "hi"',
        '"a" "b"',
    ],
)
def test_unbalanced_quotes_in_arguments(given: str) -> None:
    e = fails(f"{EXE}arguments = {given}\nqueue")
    assert e.line == 2 and "unbalanced quotes" in str(e)


@pytest.mark.parametrize(
    ("v2", "argv"),
    [
        ("", []),
        ("a", ["a"]),
        ("a  b\tc\nd\re", ["a", "b", "c", "d", "e"]),
        ("'a b'", ["a b"]),
        ("a' 'b", ["a b"]),
        ("''", [""]),
        ("''''", ["'"]),
        ('"x"', ['"x"']),
        ("a\x0bb", ["a\x0bb"]),  # only space, tab, CR, LF separate
    ],
)
def test_split_arguments(v2: str, argv: list[str]) -> None:
    assert split_arguments(v2) == argv


@pytest.mark.parametrize("v2", ["'", "a 'b", "'a''"])
def test_split_arguments_unbalanced(v2: str) -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        split_arguments(v2)


def test_join_arguments() -> None:
    assert join_arguments(["a", "b c", "", "it's"]) == "a b' 'c '' it''''s"
    with pytest.raises(ValueError):
        join_arguments(["a\x00b"])


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))))
def test_arguments_round_trip(argv: list[str]) -> None:
    assert split_arguments(join_arguments(argv)) == argv


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"), max_size=8), max_size=6))
def test_arguments_round_trip_through_the_submit_file_and_classad(argv: list[str]) -> None:
    # Written in the new syntax (double quotes doubled, '$' as $(DOLLAR) so that nothing is
    # taken for a macro), parsed, stored in a ClassAd, sent, read back.
    v2 = join_arguments(argv)
    quoted = '"' + v2.replace('"', '""').replace("$", "$(DOLLAR)") + '"'
    ad = job(f"{EXE}arguments = {quoted}\nqueue")
    again = classads.decode(classads.encode(ad))
    assert split_arguments(value(again, "Arguments")) == argv


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "env"),
    [
        ("a=1;b=2", {"a": "1", "b": "2"}),
        ("one=1;two=2;three=\"quotes have no 'special' meaning\"", {"one": "1", "two": "2", "three": "\"quotes have no 'special' meaning\""}),
        ("  a=1 ; b=x y", {"a": "1 ", "b": "x y"}),  # old syntax: only leading white space goes
        ("a=;b==", {"a": "", "b": "="}),
        ("a=1;;", {"a": "1"}),
        ('"a=1 b=\'x y\'"', {"a": "1", "b": "x y"}),
        ("\"one=1 two=\"\"2\"\" three='spacey ''quoted'' value'\"", {"one": "1", "two": '"2"', "three": "spacey 'quoted' value"}),  # manual
        ('"PATH=/bin:/usr/bin A=1 A=2"', {"PATH": "/bin:/usr/bin", "A": "2"}),
        ('""', {}),
        ("", {}),
    ],
)
def test_environment_syntaxes(given: str, env: dict[str, str]) -> None:
    ad = job(f"{EXE}environment = {given}\nqueue")
    assert parse_environment(value(ad, "Environment")) == env


def test_environment_attribute_is_v2_syntax() -> None:
    assert value(job(EXE + 'environment = "a=1 b=\'x y\'"\nqueue'), "Environment") == "a=1 b=x' 'y"


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ('"a=1', "unbalanced quotes"),
        ("\"a='1\"", "unbalanced quotes"),
        ('"a=1" b=2', "unbalanced quotes"),
        ("a=1;novalue", "missing '='"),
        ('"novalue"', "missing '='"),
        ("=1", "missing variable name"),
    ],
)
def test_environment_errors(given: str, words: str) -> None:
    e = fails(f"{EXE}environment = {given}\nqueue")
    assert e.line == 2 and words in str(e)


def test_parse_and_format_environment() -> None:
    env = {"A": "1", "B": "x y", "C": "it's", "D": "", "E": "a=b"}
    assert parse_environment(format_environment(env)) == env
    with pytest.raises(ValueError):
        parse_environment("novalue")
    with pytest.raises(ValueError):
        parse_environment("=x")
    with pytest.raises(ValueError):
        parse_environment("'a=1")
    with pytest.raises(ValueError):
        format_environment({"": "x"})


@given(
    st.dictionaries(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00="), min_size=1),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    )
)
def test_environment_round_trip(env: dict[str, str]) -> None:
    assert parse_environment(format_environment(env)) == env


# ---------------------------------------------------------------------------------------------
# Queue statements
# ---------------------------------------------------------------------------------------------


def procs(result: submit.SubmitResult) -> list[int]:
    return [value(ad, "ProcId") for ad in result.proc_ads]  # type: ignore[misc]


def argv_of(ads: list[classads.ClassAd]) -> list[list[str]]:
    return [split_arguments(value(ad, "Arguments")) for ad in ads]  # type: ignore[arg-type]


def test_plain_queue_is_one_job() -> None:
    assert procs(parse(EXE + "queue")) == [0]


def test_queue_n() -> None:
    result = parse(EXE + "arguments = $(Process) $(ProcId) $(Step) $(ItemIndex)\nqueue 3")
    assert procs(result) == [0, 1, 2]
    assert argv_of(result.job_ads()) == [["0", "0", "0", "0"], ["1", "1", "1", "0"], ["2", "2", "2", "0"]]


def test_queue_is_case_insensitive() -> None:
    assert procs(parse(EXE + "QUEUE 2")) == [0, 1]


def test_queue_in_list() -> None:
    ads = jobs(EXE + "arguments = $(color) $(ItemIndex)\nqueue color in (red, green blue)")
    assert argv_of(ads) == [["red", "0"], ["green", "1"], ["blue", "2"]]


def test_queue_in_without_parentheses_and_default_item() -> None:
    assert argv_of(jobs(EXE + "arguments = $(Item)\nqueue in a, b")) == [["a"], ["b"]]


def test_queue_in_multiline_list() -> None:
    text = EXE + "arguments = $(x)\nqueue x in (\n  a, b\n  # skipped\n\n  c\n)\noutput = after\n"
    ads = jobs(text)
    assert argv_of(ads) == [["a"], ["b"], ["c"]]
    assert all(value(ad, "Out") == "/dev/null" for ad in ads)  # the list ended at ')'


def test_queue_in_list_opened_on_the_queue_line() -> None:
    assert argv_of(jobs(EXE + "arguments = $(x)\nqueue x in (a b\n c\n)")) == [["a"], ["b"], ["c"]]


def test_queue_n_per_item_with_step() -> None:
    ads = jobs(EXE + "arguments = $(Item) $(Step) $(Process)\nqueue 2 in (a, b)")
    assert argv_of(ads) == [["a", "0", "0"], ["a", "1", "1"], ["b", "0", "2"], ["b", "1", "3"]]


def test_queue_from_inline_rows_with_several_variables() -> None:
    text = EXE + "arguments = $(a)|$(b)|$(c)\nqueue a, b, c from (\n 1, 2, 3\n x y rest of line\n # comment\n only\n)\n"
    assert argv_of(jobs(text)) == [["1|2|3"], ["x|y|rest", "of", "line"], ["only||"]]


def test_queue_from_single_variable_takes_the_whole_line() -> None:
    assert argv_of(jobs(EXE + "arguments = \"'$(line)'\"\nqueue line from (\n a b, c\n)")) == [["a b, c"]]


def test_queue_from_file_relative_to_iwd() -> None:
    seen: list[Path] = []

    def read(path: Path) -> str:
        seen.append(path)
        return "f1, -a\n\nf2, -b -c\n"

    ads = jobs(EXE + "input = $(file)\narguments = $(args)\nqueue file, args from items.txt", read_file=read)
    assert seen == [IWD / "items.txt"]
    assert [value(ad, "In") for ad in ads] == ["f1", "f2"]
    assert argv_of(ads) == [["-a"], ["-b", "-c"]]


def test_queue_from_absolute_file(tmp_path: Path) -> None:
    items = tmp_path / "items"
    items.write_text("x\ny\n", encoding="utf-8")
    assert argv_of(jobs(EXE + f"arguments = $(Item)\nqueue from {items}")) == [["x"], ["y"]]


def test_queue_from_missing_file_names_it(tmp_path: Path) -> None:
    e = fails(EXE + "queue from nothere.txt", iwd=tmp_path)
    assert e.line == 2 and str(tmp_path / "nothere.txt") in str(e)
    assert "No such file" in str(e)


def test_queue_from_file_with_nul_is_an_error() -> None:
    e = fails(EXE + "queue from f", read_file=lambda p: "a\nb\x00\n")
    assert e.line == 2 and "NUL" in str(e) and "/home/alice/run/f:2" in str(e)


def test_queue_from_file_read_error_types_become_submit_errors() -> None:
    def read(path: Path) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    assert "cannot read the item file" in str(fails(EXE + "queue from f", read_file=read))


def test_queue_var_can_set_a_command() -> None:
    # The manual's pattern: commands are macros, so queue variables can be commands.
    text = EXE + "queue input, arguments from (\n file1, -a -b 26\n file2, -c -d 92\n)"
    ads = jobs(text)
    assert [value(ad, "In") for ad in ads] == ["file1", "file2"]
    assert argv_of(ads) == [["-a", "-b", "26"], ["-c", "-d", "92"]]


def test_queue_slice() -> None:
    assert argv_of(jobs(EXE + "arguments = $(x) $(ItemIndex)\nqueue x in [1:4:2] (a b c d e)")) == [["b", "1"], ["d", "3"]]


def test_queue_zero_then_more() -> None:
    assert procs(parse(EXE + "queue 0\nqueue 2")) == [0, 1]


def test_only_zero_procs_is_an_error() -> None:
    assert "no jobs" in str(fails(EXE + "queue 0"))
    assert "no jobs" in str(fails(EXE + "queue x in ()"))


def test_multiple_queue_statements_change_later_procs() -> None:
    text = EXE + "output = a.out\narguments = first\nqueue 2\noutput = b.out\nqueue\narguments = $(Process)\nqueue"
    result = parse(text)
    ads = result.job_ads()
    assert procs(result) == [0, 1, 2, 3]
    assert [value(ad, "Out") for ad in ads] == ["a.out", "a.out", "b.out", "b.out"]
    assert argv_of(ads) == [["first"], ["first"], ["first"], ["3"]]
    # Out and Arguments differ between procs: they are per-proc, not in the cluster ad
    assert "Out" not in result.cluster_ad and "Arguments" not in result.cluster_ad
    assert value(result.cluster_ad, "Cmd") == "/bin/echo"


def test_commands_after_the_last_queue_are_ignored() -> None:
    assert value(job(EXE + "queue\noutput = late"), "Out") == "/dev/null"


@pytest.mark.parametrize(
    ("statement", "words"),
    [
        ("queue -1", "negative"),
        ("queue 2x", "not a number"),
        ("queue 1.5", "not a number"),
        ("queue foo", "bad queue statement"),
        ("queue x y in (a)", "one variable"),
        ("queue x in (a) extra", "unexpected text"),
        ("queue x from (a)", "own lines"),
        ("queue from", "file name"),
        ("queue x in (a b", "no closing"),
        ("queue x, x from (\n1 2\n)", "twice"),
        ("queue process in (a)", "cannot be a queue variable"),
        ("queue x-y in (a)", "not a variable name"),
        ("queue in [::0] (a b)", "step"),
        ("queue in [::-1] (a b)", "step"),
        ("queue in [a:b] (a b)", "bad slice"),
        ("queue x matching *.dat", "not supported"),
        ("queue from make_list.sh |", "not supported"),
        ("queue priority in (1 2)", "not supported"),
    ],
)
def test_bad_queue_statements(statement: str, words: str) -> None:
    e = fails(EXE + statement)
    assert e.line == 2 and words in str(e), str(e)


def test_queue_list_close_line_with_trailing_text() -> None:
    e = fails(EXE + "queue x in (\na\n) junk\n")
    assert e.line == 4 and "unexpected text" in str(e)


def test_queue_count_from_a_macro() -> None:
    assert procs(parse(EXE + "n = 3\nqueue $(n)")) == [0, 1, 2]


def test_too_many_procs() -> None:
    started = time.perf_counter()
    e = fails(EXE + "queue 1000001")
    assert e.line == 2 and "over the limit of 1000000" in str(e)
    e = fails(EXE + "queue 10\nqueue 10 in (a b)", max_procs=25)
    assert e.line == 3 and "30 procs" in str(e)
    assert time.perf_counter() - started < 1  # refused before anything is built
    e = fails(EXE + "queue 99999999999999999999999999")
    assert "over the limit" in str(e)
    e = fails(EXE + "queue " + "9" * 5000)  # more digits than Python's int() takes
    assert "over the limit" in str(e)


def test_max_procs_exactly_is_allowed() -> None:
    assert len(parse(EXE + "queue 5", max_procs=5).proc_ads) == 5


def test_no_queue_statement() -> None:
    e = fails(EXE + "arguments = x\n")
    assert "no queue statement" in str(e) and e.line is None and str(e).startswith("job.sub: ")


def test_missing_executable() -> None:
    e = fails("arguments = x\nqueue")
    assert e.line == 2 and "no executable" in str(e)


def test_empty_executable() -> None:
    e = fails("executable =\nqueue")
    assert e.line == 1 and "empty" in str(e)


# ---------------------------------------------------------------------------------------------
# Macros
# ---------------------------------------------------------------------------------------------


def test_cluster_and_process_macros() -> None:
    ads = jobs(EXE + "output = out.$(Cluster).$(ClusterId).$(Process).$(ProcId)\nqueue 2")
    assert [value(ad, "Out") for ad in ads] == ["out.42.42.0.0", "out.42.42.1.1"]


def test_macro_names_are_case_insensitive() -> None:
    assert value(job(EXE + "Base = x\noutput = $(BASE).$(cluster)\nqueue"), "Out") == "x.42"


def test_user_macros_expand_recursively() -> None:
    text = EXE + "base = /data/$(run)\nrun = r$(Cluster)\noutput = $(base)/out\nqueue"
    assert value(job(text), "Out") == "/data/r42/out"


def test_macros_are_expanded_at_queue_time() -> None:
    # Like condor_submit: the value in force at the queue statement counts.
    text = EXE + "output = $(name).out\nname = first\nqueue\nname = second\nqueue"
    assert [value(ad, "Out") for ad in jobs(text)] == ["first.out", "second.out"]


def test_undefined_macro_expands_to_nothing() -> None:
    assert value(job(EXE + "output = a$(nothing)b\nqueue"), "Out") == "ab"


def test_macro_default_value() -> None:
    assert value(job(EXE + "output = $(nothing:fallback)\nqueue"), "Out") == "fallback"
    assert value(job(EXE + "x = set\noutput = $(x:fallback)\nqueue"), "Out") == "set"


def test_match_time_macros_are_left_alone() -> None:
    ad = job(EXE + 'arguments = $$(Name) $$([Memory * 2])\n+Site = "$$(GLIDEIN_Site:Unknown)"\nqueue')
    assert split_arguments(value(ad, "Arguments")) == ["$$(Name)", "$$([Memory", "*", "2])"]
    assert value(ad, "Site") == "$$(GLIDEIN_Site:Unknown)"


def test_dollar_macro_and_lone_dollars() -> None:
    assert value(job(EXE + "output = $(DOLLAR)(x) $ $x $(\nqueue"), "Out") == "$(x) $ $x $("


def test_item_values_are_not_expanded_again() -> None:
    assert argv_of(jobs(EXE + "arguments = $(x)\nqueue x from (\n$(Cluster)\n)")) == [["$(Cluster)"]]


def test_macros_in_expressions_and_custom_attributes() -> None:
    ads = jobs(EXE + "limit = 100\nrequirements = TARGET.Memory > $(limit) + $(Process)\n+Index = $(Process) * 10\nqueue 2")
    assert "TARGET.Memory > 100 + 1" in text_of(ads[1], "Requirements")
    assert [value(ad, "Index") for ad in ads] == [0, 10]


def test_self_reference_appends_to_the_previous_value() -> None:
    ad = job(EXE + "args = -a\nargs = $(args) -b\narguments = $(args) -c\narguments = $(arguments) -d\nqueue")
    assert split_arguments(value(ad, "Arguments")) == ["-a", "-b", "-c", "-d"]


def test_self_reference_without_previous_value_is_empty_or_default() -> None:
    assert value(job(EXE + "x = $(x)y\noutput = $(x)\nqueue"), "Out") == "y"
    assert value(job(EXE + "x = $(x:d)y\noutput = $(x)\nqueue"), "Out") == "dy"


def test_macro_cycle_is_an_error() -> None:
    e = fails(EXE + "a = $(b)\nb = $(c)\nc = $(a)\noutput = $(a)\nqueue")
    assert e.line == 5 and "refers to itself" in str(e) and "a -> b -> c -> a" in str(e)


def test_deep_macro_nesting_is_an_error() -> None:
    lines = [f"m{i} = $(m{i + 1})" for i in range(200)]
    e = fails(EXE + "\n".join(lines) + "\noutput = $(m0)\nqueue")
    assert "nest deeper" in str(e)


def test_exponential_macro_growth_is_an_error() -> None:
    lines = ["m0 = xxxxxxxxxxxxxxxx"] + [f"m{i + 1} = $(m{i})$(m{i})" for i in range(40)]
    started = time.perf_counter()
    e = fails(EXE + "\n".join(lines) + "\noutput = $(m40)\nqueue")
    assert "more than" in str(e)
    assert time.perf_counter() - started < 5


def test_self_reference_growth_is_an_error() -> None:
    lines = ["m = xxxxxxxxxxxxxxxx"] + ["m = $(m)$(m)"] * 40
    e = fails(EXE + "\n".join(lines) + "\noutput = $(m)\nqueue")
    assert "more than" in str(e)


@pytest.mark.parametrize("macro", ["$ENV(HOME)", "$RANDOM_CHOICE(a,b)", "$INT(x)", "$Fn(x)", "$Fpnx(x)", "$SUBSTR(x,1)"])
def test_macro_functions_are_refused(macro: str) -> None:
    e = fails(f"{EXE}output = {macro}\nqueue")
    assert e.line == 2 and "not supported" in str(e)


@pytest.mark.parametrize("name", ["Process", "ProcId", "Cluster", "ClusterId", "Item", "ItemIndex", "Step", "Row"])
def test_predefined_macros_cannot_be_assigned(name: str) -> None:
    e = fails(f"{EXE}{name} = 3\nqueue")
    assert e.line == 2 and "cannot be assigned" in str(e)


# ---------------------------------------------------------------------------------------------
# Unknown commands and other errors
# ---------------------------------------------------------------------------------------------


def test_unknown_command_names_file_line_and_suggestion() -> None:
    e = fails("executabel = /bin/echo\nqueue")
    assert str(e).startswith('job.sub:1: unknown command "executabel"')
    assert 'did you mean "executable"' in str(e)
    assert (e.filename, e.line) == ("job.sub", 1)


@pytest.mark.parametrize(("typo", "suggestion"), [("requst_memory", "request_memory"), ("argumnets", "arguments"), ("transfer_input_file", "transfer_input_files")])
def test_unknown_command_suggestions(typo: str, suggestion: str) -> None:
    assert f'did you mean "{suggestion}"' in str(fails(f"{EXE}{typo} = 1\nqueue"))


def test_unknown_command_without_close_match() -> None:
    e = fails(EXE + "zzzzzz = 1\nqueue")
    assert "unknown command" in str(e) and "did you mean" not in str(e)


def test_unknown_name_used_as_macro_is_a_macro() -> None:
    assert value(job(EXE + "dataset = run7\noutput = $(dataset).out\nqueue"), "Out") == "run7.out"
    assert value(job(EXE + "output = $(dataset:x).out\ndataset = run7\nqueue"), "Out") == "run7.out"


def test_name_used_only_at_match_time_is_not_a_macro_use() -> None:
    assert "unknown command" in str(fails(EXE + "site = x\n+S = \"$$(site)\"\nqueue"))


@pytest.mark.parametrize("command", ["priority", "request_gpus", "max_retries", "hold", "on_exit_remove", "stream_output", "accounting_group"])
def test_unsupported_htcondor_commands_are_errors(command: str) -> None:
    e = fails(f"{EXE}{command} = 1\nqueue")
    assert e.line == 2 and "not supported by gwms" in str(e)


@pytest.mark.parametrize("line", ["if defined x", "else", "endif", "include : other.sub", "use feature : foo"])
def test_unsupported_statements(line: str) -> None:
    e = fails(f"{EXE}{line}\nqueue")
    assert e.line == 2 and "not supported" in str(e)


def test_error_command_is_still_the_stderr_command() -> None:
    assert value(job(EXE + "error = e.txt\nqueue"), "Err") == "e.txt"


def test_missing_equals() -> None:
    e = fails(EXE + "output out.txt\nqueue")
    assert e.line == 2 and 'missing "="' in str(e)


@pytest.mark.parametrize("line", ["= value", "out put = x", "a/b = 1", "queue = 3"])
def test_bad_command_names(line: str) -> None:
    assert fails(f"{EXE}{line}\nqueue").line == 2


def test_multi_line_values_are_refused() -> None:
    assert "not supported" in str(fails(EXE + "arguments @=end\n a\n@end\nqueue"))


def test_error_from_a_per_proc_value_names_the_proc() -> None:
    e = fails(EXE + "request_memory = $(Item)\nqueue in (1G, 2G, lots!)")
    assert e.line == 2 and "proc 2" in str(e) and "bad number" in str(e)


def test_error_from_a_queue_variable_command_names_the_queue_line() -> None:
    e = fails(EXE + "queue request_memory from (\n1G\n12XB\n)")
    assert e.line == 2 and "bad" in str(e)


def test_submit_error_is_a_value_error() -> None:
    assert isinstance(fails("nonsense"), ValueError)


def test_caller_mistakes_are_not_submit_errors() -> None:
    with pytest.raises(ValueError):
        parse(EXE + "queue", iwd=Path("relative"))
    with pytest.raises(ValueError):
        parse(EXE + "queue", max_procs=0)
    with pytest.raises(TypeError):
        parse(b"executable = x\nqueue")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Cluster ad and proc ads
# ---------------------------------------------------------------------------------------------


def test_proc_ads_hold_only_what_differs() -> None:
    result = parse(EXE + "arguments = -n $(Process)\nrequest_memory = 1G\nqueue 3")
    assert [set(ad) for ad in result.proc_ads] == [{"ProcId", "Arguments"}] * 3
    assert value(result.cluster_ad, "RequestMemory") == 1024
    assert "ProcId" not in result.cluster_ad
    assert value(result.cluster_ad, "ClusterId") == 42


def test_static_cluster_has_procid_only_proc_ads() -> None:
    result = parse(EXE + "queue 4")
    assert [list(ad) for ad in result.proc_ads] == [["ProcId"]] * 4


def test_per_proc_value_that_is_the_same_everywhere_goes_to_the_cluster() -> None:
    result = parse(EXE + "output = $(x).out\nqueue x in (a)\nqueue 1 x in (a)")
    assert value(result.cluster_ad, "Out") == "a.out"
    assert all(set(ad) == {"ProcId"} for ad in result.proc_ads)


def test_attribute_present_in_some_statements_only() -> None:
    result = parse(EXE + "queue\nlog = j.log\nqueue")
    assert "UserLog" not in result.cluster_ad
    ads = result.job_ads()
    assert "UserLog" not in ads[0] and value(ads[1], "UserLog") == "/home/alice/run/j.log"


def test_job_ads_merge_cluster_and_proc() -> None:
    result = parse(EXE + "output = o.$(Process)\nqueue 2")
    for proc, ad in zip(result.proc_ads, result.job_ads()):
        for name in result.cluster_ad:
            if name not in proc:
                assert repr(ad.lookup(name)) == repr(result.cluster_ad.lookup(name))
        for name in proc:
            assert repr(ad.lookup(name)) == repr(proc.lookup(name))


def test_job_ads_encode_and_decode() -> None:
    text = EXE + 'arguments = "a \'b c\'"\nenvironment = "X=1"\n+Note = "line1\\nline2"\nrequirements = Memory > 1\nqueue 2'
    for ad in jobs(text):
        again = classads.decode(classads.encode(ad))
        assert {n: repr(again.lookup(n)) for n in again} == {n: repr(ad.lookup(n)) for n in ad}


def test_control_characters_in_values_survive_classad_quoting() -> None:
    weird = "a\x01b\x1fc\\d\"e\x7f\u2028é"
    ad = job(f"{EXE}output = {weird}\narguments = {weird.replace(chr(34), '')}\nqueue")
    again = classads.decode(classads.encode(ad))
    assert value(again, "Out") == weird


# ---------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------


def test_nul_byte_is_an_error_naming_the_line() -> None:
    e = fails(EXE + "arguments = a\x00b\nqueue")
    assert e.line == 2 and "NUL" in str(e)


def test_lone_surrogates_are_an_error() -> None:
    # classad2 crashes the process on such strings: they must never reach it.
    e = fails(EXE + "output = a\udc80b\nqueue")
    assert e.line == 2 and "Unicode" in str(e)


def test_submit_directory_that_is_not_unicode() -> None:
    e = fails(EXE + "queue", iwd=Path("/home/\udcff/run"))
    assert "not valid Unicode" in str(e)
    with pytest.raises(ValueError):
        parse(EXE + "queue", owner="a\udc80")


def test_ten_megabyte_file() -> None:
    big = "# " + "x" * 100 + "\n"
    text = EXE + big * (10 * 1024 * 1024 // len(big)) + "arguments = " + "a " * 100_000 + "\nqueue\n"
    assert len(text) > 10 * 1024 * 1024
    started = time.perf_counter()
    ad = job(text)
    assert len(split_arguments(value(ad, "Arguments"))) == 100_000
    assert time.perf_counter() - started < 10


def test_ten_megabyte_single_line_with_dollars() -> None:
    text = EXE + "output = " + "$(" * (5 * 1024 * 1024) + "\nqueue\n"
    started = time.perf_counter()
    assert value(job(text), "Out").startswith("$($(")
    assert time.perf_counter() - started < 10


def test_large_per_proc_values_are_bounded() -> None:
    # A 4 MB item referenced 10 times in every one of many procs would be gigabytes.
    item = "x" * (4 * 1024 * 1024)
    text = EXE + "arguments = " + "$(Item)" * 10 + "\nqueue 1000 in (" + item + ")\n"
    e = fails(text)
    assert "more than" in str(e) or "too much" in str(e)


def test_a_million_procs_are_refused_quickly_beyond_the_limit() -> None:
    started = time.perf_counter()
    assert "over the limit" in str(fails(EXE + "queue 10 in (" + "a " * 100_001 + ")"))
    assert time.perf_counter() - started < 2


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_random_text_raises_only_submit_error(text: str) -> None:
    try:
        parse(text)
    except SubmitError:
        pass


_VOCABULARY = st.sampled_from(
    [
        "executable = /bin/sh",
        "executable =",
        "arguments = ",
        'arguments = "',
        "arguments = '",
        "environment = a=1;b",
        'environment = "a',
        "queue",
        "queue 2",
        "queue -1",
        "queue 0",
        "queue x in (",
        "queue x in (a b)",
        "queue x, y from (",
        "queue from f",
        ")",
        "a, b",
        "request_memory = 2G",
        "request_memory = $(x)",
        "requirements = Memory > $(x)",
        "requirements = (",
        "+A = $(x)",
        "+A = \"",
        "x = $(y)",
        "y = $(x)",
        "x = $(x)$(x)",
        "output = $(Item).$(Process)",
        "initialdir = $(x)",
        "log = $(Cluster)",
        "# comment \\",
        "\\",
        "$$(",
        "$(",
        "universe = vanilla",
        "should_transfer_files = NO",
        "when_to_transfer_output = ON_EXIT",
        "notification = $(x)",
        "job_lease_duration = 9999999999999999999999",
    ]
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_VOCABULARY, st.text(max_size=20)), max_size=12), st.text(max_size=40))
def test_structured_random_files_raise_only_submit_error(lines: list[str], file_content: str) -> None:
    try:
        result = parse("\n".join(lines), read_file=lambda p: file_content, max_procs=50)
    except SubmitError:
        return
    for ad in result.job_ads():
        classads.encode(ad)  # whatever was accepted is storable


# ---------------------------------------------------------------------------------------------
# Performance
# ---------------------------------------------------------------------------------------------


def test_queue_100000_simple_jobs_is_fast() -> None:
    started = time.process_time()
    result = parse(EXE + "arguments = -v\nrequest_memory = 1G\nqueue 100000")
    elapsed = time.process_time() - started
    assert len(result.proc_ads) == 100_000
    assert elapsed < 2, elapsed


def test_queue_100000_jobs_with_per_proc_values() -> None:
    started = time.process_time()
    result = parse(EXE + "arguments = -n $(Process)\noutput = out.$(Process)\nqueue 100000")
    elapsed = time.process_time() - started
    assert value(result.proc_ads[99_999], "Out") == "out.99999"
    assert elapsed < 4, elapsed


def test_transfer_executable_sets_the_attribute_and_defaults_to_true(tmp_path):
    from gwms.submit import parse_submit as parse

    kept = parse("executable = /bin/true\ntransfer_executable = false\nqueue\n", cluster_id=1, owner="u", iwd=tmp_path)
    assert kept.job_ads()[0]["TransferExecutable"] is False
    default = parse("executable = /bin/true\nqueue\n", cluster_id=1, owner="u", iwd=tmp_path)
    assert default.job_ads()[0].get("TransferExecutable", True) is True
