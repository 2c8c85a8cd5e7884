"""What the node accepts and sends: the single source for the SCP, the SCU and the conformance statement."""

from __future__ import annotations

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import sop_class as sc

# Image storage SOP classes the C-STORE SCP accepts (PS3.4 Annex B). Stored as received, never transcoded.
IMAGE_STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.LegacyConvertedEnhancedMRImageStorage,
    sc.ComputedRadiographyImageStorage,
    sc.DigitalXRayImageStorageForPresentation,
    sc.DigitalXRayImageStorageForProcessing,
    sc.DigitalMammographyXRayImageStorageForPresentation,
    sc.DigitalMammographyXRayImageStorageForProcessing,
    sc.BreastTomosynthesisImageStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.EnhancedPETImageStorage,
    sc.NuclearMedicineImageStorage,
    sc.UltrasoundImageStorage,
    sc.UltrasoundMultiFrameImageStorage,
    sc.XRayAngiographicImageStorage,
    sc.XRayRadiofluoroscopicImageStorage,
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
)

# Transfer syntaxes accepted for every SOP class above, in order of preference. pynetdicom accepts the
# first entry of this list that the sender proposed, so compressed syntaxes come first: a sender that
# proposes [JPEG Lossless, Explicit VR LE] for a compressed instance then sends it as it is, and the
# node stores it as received instead of making the sender decompress it.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

VERIFICATION_SOP_CLASS: UID = sc.Verification

# C-STORE response statuses the SCP uses (PS3.4 Table B.2-1; PS3.7 C.4.2.1.4).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # spool or database unavailable, disk under reserve: peer may retry
STATUS_DATASET_DOES_NOT_MATCH = 0xA900  # required UIDs missing
STATUS_CANNOT_UNDERSTAND = 0xC210  # unreadable dataset

# A-ASSOCIATE-RJ for an unknown calling AE: rejected-permanent, service-user, calling AE not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
