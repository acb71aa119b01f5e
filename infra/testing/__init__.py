"""Real servers and real data for tests, benchmarks and the demo — never imported by
library code: a SeaweedFS S3 server on loopback (``s3_server``) and ImageNet-like
photos from the images bundled with scikit-image and scikit-learn (``photos``)."""
