from tests.support.inference import mini_shards  # noqa: F401  (a fixture: small real CIFAR-10 shards)
