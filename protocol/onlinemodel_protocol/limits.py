"""Every default and bound of a training setting, defined once.

``RuntimeConfig`` (the ``onlinemodel serve`` flags), the ``POST /train`` parser and the operator's CRD
(``operator/onlinemodel_operator/models_spec.py``) read these, so all three accept the same values
(tests/protocol/test_protocol_limits.py checks that they do).
"""

# Learning rate: in (0, LEARNING_RATE_MAX]. The default is the best of the teach-a-fact sweep
# (bench/teach_fact_optimizers.py, docs/benchmarks.md); torch's usual 1e-3 wrecks a served model.
LEARNING_RATE_DEFAULT = 3e-5
LEARNING_RATE_MAX = 1.0

# Rank of the optimizer's low-rank state for the 2-D matrices (1: APOLLO-Mini; above 1: APOLLO with a scale per
# channel). 64, the seed's own trainer's: over 32 facts taught one by one it kept more of what the model knew than
# rank 1 (bench/continual_sweep.py, docs/learning.md). MoE experts stay APOLLO-Mini (optim/policy.py).
OPTIMIZER_RANK_DEFAULT = 64
OPTIMIZER_RANK_MAX = 4096

# Per POST /train request.
MAX_EXAMPLES_DEFAULT = 64  # examples per request (--max-examples)
MAX_EXAMPLES_CEILING = 100_000  # the largest --max-examples accepted
MAX_MESSAGES = 256  # messages per example
# Passes over the examples when a request names none (--default-epochs): with early stop (below) the
# bound on them, not a count every example runs: 40 lets a fact learned against the anchor term's pull get
# the passes it needs (bench/continual_sweep.py: at 20, 3 of 32 facts were not back after their job).
EPOCHS_DEFAULT = 40
MAX_EPOCHS_DEFAULT = 40

# Learning that stays good over many jobs (docs/learning.md, chosen by bench/continual.py). Early stop: an
# example leaves its job once greedy decoding gives its answer back (--no-early-stop: always `epochs`).
EARLY_STOP_DEFAULT = True
# How each update is written into bf16 weights (--weight-rounding; docs/optimizer.md, "Why"):
# stochastic (unbiased, adds noise), nearest (only where runs must be compared bitwise: an update below half a
# bf16 step is lost), compensated (to nearest with the remainder carried: 2 more bytes per trained element).
WEIGHT_ROUNDINGS = ("stochastic", "nearest", "compensated")
WEIGHT_ROUNDING_DEFAULT = "stochastic"
# ... and only once every answer token's logit leads the runner-up's by this much (nats; --early-stop-margin):
# an answer barely learned is trained a step further, so it survives later jobs and near ties in decoding.
EARLY_STOP_MARGIN_DEFAULT = 1.0
EARLY_STOP_MARGIN_MAX = 100.0
# Replay: each job also trains this many examples of earlier jobs (--replay-examples; 0: none), drawn from a
# reservoir that keeps a uniform sample of at most REPLAY_RESERVOIR_DEFAULT of them (--replay-reservoir) and
# REPLAY_RESERVOIR_MAX_TOKENS tokens (ids and labels: 8 bytes a token in memory, ~16 in trainer_state.json).
REPLAY_EXAMPLES_DEFAULT = 4
REPLAY_EXAMPLES_MAX = 64
REPLAY_RESERVOIR_DEFAULT = 64
REPLAY_RESERVOIR_MAX = 4096
REPLAY_RESERVOIR_MAX_TOKENS = 262_144
# The anchor term (trainer/anchor.py): every step adds ANCHOR_WEIGHT x the KL from the untouched model's
# next-token distributions on ANCHOR_PER_STEP general conversations (in turn), recorded as their
# ANCHOR_TOP_K most likely tokens and the rest (--anchor-weight; 0: off). 8 rather than 4: more general answers
# kept for a quarter more steps per fact (docs/learning.md, "Anchor weight 8").
ANCHOR_WEIGHT_DEFAULT = 8.0
ANCHOR_WEIGHT_MAX = 100.0
ANCHOR_PER_STEP = 2
ANCHOR_TOP_K = 32
# Updates kept out of the directions general inputs use (trainer/null_space.py): per trained matrix, the
# directions holding this share of its inputs' energy on the anchor conversations (--null-space-energy; 0: off).
NULL_SPACE_ENERGY_DEFAULT = 0.9
NULL_SPACE_ENERGY_MAX = 0.999
# What one pass gathering those directions may hold (float32 second moments of the inputs): a larger model takes
# more passes over the anchor conversations.
NULL_SPACE_MAX_BYTES = 2 * 1024**3

# The trainer's queue and history.
MAX_QUEUED_JOBS_DEFAULT = 16  # more is a 429
RECENT_JOBS = 20  # jobs listed by GET /train/status

# Checkpoints.
CHECKPOINT_KEEP_DEFAULT = 3
CHECKPOINT_KEEP_MAX = 1000
FINAL_CHECKPOINT_TIMEOUT_DEFAULT = 60.0  # seconds for the checkpoint taken on SIGTERM

# The trainer process.
TRAINER_START_TIMEOUT_DEFAULT = 600.0  # seconds to wait for vLLM's exported weights
TRAINER_RESTART_LIMIT_DEFAULT = 5

# Periodic checkpoints (when a checkpoint directory is set): whichever comes first, and only when the
# weights changed since the last one. 0 turns one trigger off.
CHECKPOINT_EVERY_STEPS_DEFAULT = 1000
CHECKPOINT_EVERY_SECONDS_DEFAULT = 900.0

# Request bodies of the training routes, refused with 413 before they are parsed (--max-body-bytes).
MAX_BODY_BYTES_DEFAULT = 8 * 1024 * 1024
MAX_BODY_BYTES_MIN = 1024
MAX_BODY_BYTES_CEILING = 1024 * 1024 * 1024
# Characters of one example's messages per token of --max-model-len: an example with more is refused with
# 413 before its chat template is rendered. Chat text averages 3-5 characters per token; 16 leaves room
# for code and runs of whitespace.
MAX_CHARS_PER_TOKEN = 16
# Idempotency-Key of POST /train: its longest accepted value, and how many keys the server remembers
# (the newest; an older key is forgotten and a retry with it would queue a new job).
IDEMPOTENCY_KEY_MAX_LENGTH = 255
IDEMPOTENCY_KEYS_REMEMBERED = 1024

# Checkpoint health: a checkpoint becomes `latest` only if every weight is finite and the loss of the
# last HEALTH_LOSS_WINDOW steps is neither non-finite anywhere nor diverging: its mean above both
# HEALTH_DIVERGENCE_FACTOR x the lowest such mean seen and ln(vocabulary size), the loss of a uniform guess.
HEALTH_LOSS_WINDOW = 8
HEALTH_DIVERGENCE_FACTOR = 4.0

# Serving first: decode may get at most this much slower (p99 time per token) while training runs
# (docs/serving-first.md). A budget is at least 1 (no slowdown at all: training only waits) and at most
# MAX_DECODE_SLOWDOWN_MAX; DECODE_SLOWDOWN_OFF (`--max-decode-slowdown off`) turns pacing off.
MAX_DECODE_SLOWDOWN_DEFAULT = 1.25
MAX_DECODE_SLOWDOWN_MAX = 100.0
DECODE_SLOWDOWN_OFF = 0.0
# The quantile of the gaps between a stream's tokens that the budget bounds: p99, what vLLM's users watch
# (TPOT/ITL tails) and what the acceptance of issue 16 measures. The controller steers it; the status reports it.
DECODE_SLOWDOWN_QUANTILE = 0.99

# Retry-After (seconds) on the training routes' 503 (the trainer is starting or restarting) and 429 (the
# queue is full): a client that waits this long and retries succeeds once the trainer is up or a job ended.
RETRY_AFTER_STARTING_SECONDS = 5
RETRY_AFTER_QUEUE_FULL_SECONDS = 10
# The guard (docs/guard.md): probes evaluated after every job on the live weights.
GUARD_MAX_PROBES = 64  # probes per guard file: each is decoded after every job
GUARD_PROBE_MAX_TOKENS_DEFAULT = 32  # tokens decoded per probe (greedy)
GUARD_PROBE_MAX_TOKENS_MAX = 512
GUARD_HELDOUT_MAX_TOKENS = 4096  # a longer held-out text is cut here
GUARD_HELDOUT_MAX_INCREASE_DEFAULT = 0.05  # relative: the held-out loss may rise by 5% per job
CONFIGMAP_MAX_BYTES = 1024 * 1024  # a ConfigMap holds at most 1 MiB: the bound of a file read from one
GUARD_FILE_MAX_BYTES = CONFIGMAP_MAX_BYTES
# The anchor file (--anchor-file, docs/learning.md "Your own anchor conversations"): a deployment's own
# conversations for the anchor term. Its record costs 8 ANCHOR_TOP_K + 4 bytes per reply token (trainer/anchor.py):
# at these bounds at most 64 x 1024 tokens, 17 MB, and about 8 MB for replies of ~4 characters a token.
ANCHOR_FILE_MAX_CONVERSATIONS = 64
ANCHOR_CONVERSATION_MAX_CHARS = 2000  # all of one conversation's messages together
ANCHOR_CONVERSATION_MAX_TOKENS = 1024  # in the served model's chat template; longer: refused at the trainer's start
ANCHOR_FILE_MAX_BYTES = CONFIGMAP_MAX_BYTES
# Replicas (docs/operator.md "Scaling out"): one learner and followers that serve its weights.
REPLICAS_DEFAULT = 1
REPLICAS_MAX = 64
# The learner publishes a new weight version when a job ends and, while one runs, at most every this many
# seconds (--sync-interval, spec.replication.syncIntervalSeconds).
SYNC_INTERVAL_DEFAULT = 30.0
SYNC_INTERVAL_MIN = 1.0
SYNC_INTERVAL_MAX = 86_400.0
# How often a follower asks the learner for its latest version (a small JSON request).
FOLLOW_POLL_SECONDS = 2.0
# A follower behind the learner by more seconds than this gets the FollowerBehind condition
# (spec.replication.maxLagSeconds).
MAX_FOLLOWER_LAG_DEFAULT = 300.0
MAX_FOLLOWER_LAG_MAX = 86_400.0
# The learner publishes only while a follower asked within this many seconds, and lists a follower in
# /train/status until it has been silent this long x 10.
FOLLOWER_ACTIVE_SECONDS = 60.0
# The largest JSON header of one tensor frame in a weight stream (a name, a dtype, a shape).
FRAME_HEADER_MAX_BYTES = 64 * 1024
# Tensor parallelism (docs/tensor-parallel.md): the most ranks, one vLLM worker and one trainer process each,
# all on one node.
TENSOR_PARALLEL_SIZE_MAX = 16
