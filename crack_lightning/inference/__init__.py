"""Using a trained model: prediction, localisation, explanation, export, reports and site calibration."""
