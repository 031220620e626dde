"""Sentiment's baseline `tfidf_logreg`: TF-IDF over word 1- and 2-grams (rnnlab's own tokenizer) and a logistic
regression (scikit-learn), its inverse regularisation C chosen on validation accuracy."""

from __future__ import annotations

from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from rnnlab.baselines.common import Outputs, best_on_validation, classifier_outputs, split_ids
from rnnlab.data.base import SPLITS, SplitTensorDataModule, missing_hint
from rnnlab.data.sentiment import RAW_FILE, read_reviews_csv, tokenize
from rnnlab.errors import DataError


def tfidf_logistic_regression(raw_dir: Path, data: SplitTensorDataModule, c_grid: list[float], ngram_max: int, min_df: int) -> Outputs:
    """Fit TF-IDF + logistic regression on train for each C of `c_grid`, keep the best on validation accuracy, and
    score the test reviews; the per-review test outputs and the metrics."""
    ids = split_ids(data.processed_dir, data.limits, data.task)
    if not (raw_dir / RAW_FILE).is_file():
        raise DataError(f"{raw_dir / RAW_FILE} is missing: {missing_hint('sentiment', 'fetch')}.")
    reviews = read_reviews_csv(raw_dir / RAW_FILE).set_index("id")
    texts = {split: reviews.loc[ids[split], "text"].tolist() for split in SPLITS}
    labels = {split: reviews.loc[ids[split], "label"].astype(int).to_numpy() for split in SPLITS}
    vectorizer = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None, ngram_range=(1, ngram_max), min_df=min_df)
    vectorizer.set_params(sublinear_tf=True)
    features = {"train": vectorizer.fit_transform(texts["train"])}
    features |= {split: vectorizer.transform(texts[split]) for split in ("val", "test")}
    best, val_acc, model = best_on_validation(c_grid, lambda c: LogisticRegression(C=c, max_iter=2000), features, labels)
    outputs, test_acc, test_loss = classifier_outputs(model, features["test"], labels["test"], 2, ids["test"], ids["test"])
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "val_acc": val_acc, "C": best, "features": len(vectorizer.vocabulary_)}
    return {"tfidf_logreg": (outputs, metrics)}
